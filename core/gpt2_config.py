"""A GPT-2 config.json as plain attributes, without importing transformers (its top level costs ~30 MB of a serving
process): what core.gpt2_model's tree and the engine read. Where transformers' own code runs (a GPU, `as_transformers`,
a configuration the own tree does not serve), `to_transformers` makes the real `GPT2Config` from the same values."""

from __future__ import annotations

import json
from pathlib import Path

# transformers' GPT2Config defaults for the keys this project reads or that change what GPT-2 computes
# (tests/test_gpt2_config.py checks them against the installed transformers).
DEFAULTS: dict[str, object] = {
    "model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
    "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "add_cross_attention": False,
    "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": None,
}
# GPT2Config's attribute_map: the generic names some config.json files use.
ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
           "num_hidden_layers": "n_layer"}


class GPT2Settings:
    """config.json's values as attributes (GPT2Config's defaults where a key is missing; unknown keys, such as
    `sentiment_labels`, kept as they are)."""

    def __init__(self, values: dict[str, object]):
        self.values = {ALIASES.get(key, key): value for key, value in values.items()}
        self.__dict__.update(DEFAULTS | self.values)

    @classmethod
    def from_file(cls, path: Path) -> GPT2Settings:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise ValueError(f"{path} holds no JSON object")
        return cls(values)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> GPT2Settings:
        return cls(values)

    def to_dict(self) -> dict[str, object]:
        """Every value, the defaults included (as GPT2Config's `to_dict`)."""
        return DEFAULTS | self.values

    def to_transformers(self) -> object:
        """transformers' GPT2Config from the same values (imports transformers)."""
        from transformers import GPT2Config

        return GPT2Config.from_dict(dict(self.values))

    def __repr__(self) -> str:
        return f"GPT2Settings({self.values!r})"


def transformers_config(config: object) -> object:
    """`config` as transformers' GPT2Config: converted where it is a GPT2Settings, else as it is."""
    return config.to_transformers() if isinstance(config, GPT2Settings) else config
