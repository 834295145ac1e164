"""The serving tokenizer: a `tokenizers.Tokenizer` with the special tokens transformers' `PreTrainedTokenizerFast`
would give it, offering the few calls core/ and bot/ make (tokenize, decode, token ↔ id, special ids).

Importing transformers' tokenizer class loads transformers' top level and through it huggingface_hub's HTTP stack
(~300 modules, ~27 MB) that a bot serving a local model never uses. The results are those of
`PreTrainedTokenizerFast.from_pretrained(directory, **SPECIAL_TOKENS)`: the same Rust tokenizer, set up the same way
(tests/test_tokenizer.py compares the two, and their serialized pipelines)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, processors

# transformers' named special tokens, in its order (the order new ones get their ids in).
NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' clean-up of spaces before punctuation (WordPiece's; it skips it for BPE, whose spaces are real).
_CLEAN_UP = (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"), \
    (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")


def _content(value: object) -> str | None:
    """A special token's text as tokenizer_config.json or special_tokens_map.json write it (a string or an object)."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _extra(values: object) -> list[str]:
    values = values.values() if isinstance(values, dict) else values or []
    return [text for value in values if (text := _content(value))]


class TextTokenizer:
    """What the engine and the HTTP routes ask of a tokenizer, with PreTrainedTokenizerFast's results."""

    def __init__(self, backend: Tokenizer, special: dict[str, str], extra: Sequence[str] = (),
                 config: dict | None = None):
        config = config or {}
        self.backend = backend
        self._special = {name: special[name] for name in NAMED if special.get(name)}
        self._extra = list(dict.fromkeys(extra))
        present = {token.content: token for token in backend.get_added_tokens_decoder().values()}
        wanted = list(dict.fromkeys([*self._special.values(), *self._extra]))
        # As transformers does: each marked special (so it splits the text where it occurs and skip_special_tokens
        # drops it), a new one taking the next id, in this order.
        backend.add_special_tokens([present.get(text) or AddedToken(text, special=True, normalized=False)
                                    for text in wanted])
        if backend.post_processor is None:
            # transformers' template for PreTrainedTokenizerFast: nothing around the text, even where the config has
            # add_bos_token/add_eos_token (only its model-specific subclasses read those; tests/test_tokenizer.py)
            backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
        backend.no_truncation()
        backend.no_padding()
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._bpe = type(backend.model).__name__ == "BPE"
        self._force_clean_up = bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))

    @classmethod
    def from_files(cls, tokenizer_json: Path, special: dict[str, str], tokenizer_config: Path | None = None,
                   special_tokens_map: Path | None = None) -> TextTokenizer:
        """tokenizer.json, with tokenizer_config.json and special_tokens_map.json where there are; `special` (the named
        special tokens) wins over what those files name."""
        config = _read_json(tokenizer_config)
        # transformers reads the legacy special_tokens_map.json only for a config without added_tokens_decoder.
        mapped = {} if "added_tokens_decoder" in config else _read_json(special_tokens_map)
        named = {name: text for name in NAMED if (text := _content(mapped.get(name, config.get(name))))}
        named.update(special)
        extra = _extra(config.get("extra_special_tokens") or config.get("additional_special_tokens"))
        extra += _extra(mapped.get("extra_special_tokens") or mapped.get("additional_special_tokens"))
        return cls(Tokenizer.from_file(str(tokenizer_json)), named, extra, config)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, list]:
        """{"input_ids": …, "attention_mask": …} of one text (lists of ints) or of several (lists of those)."""
        if isinstance(text, str):
            encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
            return {"input_ids": encoding.ids, "attention_mask": encoding.attention_mask}
        encodings = self.backend.encode_batch(list(text), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings]}

    def encode(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None) -> list[int]:
        """The ids of `text`; with `return_tensors="pt"` a 1 × length torch tensor, as transformers gives it."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if return_tensors is None:
            return ids
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        import torch

        return torch.tensor([ids], dtype=torch.long)

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        clean_up = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if clean_up and (not self._bpe or self._force_clean_up):
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        """A token's id (the unknown token's for one not in the vocabulary), or each of several tokens' ids."""
        if isinstance(tokens, str):
            found = self.backend.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str | None | list:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend.id_to_token(int(i)) for i in ids if int(i) not in skip]

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self._special.values(), *self._extra]))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(token) for token in self.all_special_tokens]

    def _token(self, name: str) -> str | None:
        return self._special.get(name)

    def _id(self, name: str) -> int | None:
        text = self._special.get(name)
        return None if text is None else self.convert_tokens_to_ids(text)

    bos_token = property(lambda self: self._token("bos_token"))
    eos_token = property(lambda self: self._token("eos_token"))
    unk_token = property(lambda self: self._token("unk_token"))
    pad_token = property(lambda self: self._token("pad_token"))
    mask_token = property(lambda self: self._token("mask_token"))
    bos_token_id = property(lambda self: self._id("bos_token"))
    eos_token_id = property(lambda self: self._id("eos_token"))
    unk_token_id = property(lambda self: self._id("unk_token"))
    pad_token_id = property(lambda self: self._id("pad_token"))
    mask_token_id = property(lambda self: self._id("mask_token"))


def _read_json(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}
