"""core/gpt2_config.py: config.json read without transformers, with GPT2Config's defaults and its conversion."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import GPT2Config

from core.gpt2_config import ALIASES, DEFAULTS, GPT2Settings, transformers_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_defaults_are_transformers_gpt2_defaults():
    reference = GPT2Config()
    assert {key: getattr(reference, key) for key in DEFAULTS} == DEFAULTS
    assert GPT2Config.attribute_map == ALIASES


def test_the_embedded_config_reads_as_transformers_reads_it():
    path = ROOT / "models" / "nsmc-small" / "config.json"
    ours, theirs = GPT2Settings.from_file(path), GPT2Config.from_pretrained(path.parent)
    for key in {*DEFAULTS, *json.loads(path.read_text())} - {"dtype", "transformers_version", "architectures"}:
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.sentiment_labels == {"positive": "긍정", "negative": "부정"}
    converted = transformers_config(ours)
    assert type(converted) is GPT2Config and converted.to_dict() == theirs.to_dict()


def test_missing_keys_take_the_defaults_and_aliases_their_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 99}))
    ours = GPT2Settings.from_file(tmp_path / "config.json")
    theirs = GPT2Config.from_pretrained(tmp_path)
    for key in DEFAULTS:
        assert getattr(ours, key) == getattr(theirs, key), key
    assert (ours.n_embd, ours.n_layer, ours.n_head) == (64, 2, 12)
    assert transformers_config(theirs) is theirs
    changed = ours.from_dict({**ours.to_dict(), "tie_word_embeddings": False})
    assert type(changed) is GPT2Settings and not changed.tie_word_embeddings and changed.n_embd == 64
