"""Tiny KoGPT2-format models for tests: a BPE tokenizer trained on NSMC reviews, random GPT-2 weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from core.tokenizer_training import read_nsmc, train_tokenizer

NSMC_DIR = Path(os.environ.get("NSMC_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "nsmc"))

# Used only where the NSMC files are absent (a clone without ../shared), so the suite still runs.
_FALLBACK = [
    ("아 정말 재밌다 최고의 영화", 1), ("정말 재미없음 시간 아까움", 0), ("배우들 연기가 좋았다", 1),
    ("스토리가 너무 지루하다", 0), ("감동적이고 아름다운 영화", 1), ("최악의 영화 별로다", 0),
] * 50


def sample_reviews(limit: int = 4000) -> list[tuple[str, int]]:
    path = NSMC_DIR / "ratings_train.txt"
    return read_nsmc(path, limit) if path.exists() else list(_FALLBACK)


def build_tiny(directory: Path, vocab_size: int = 2000, seed: int = 0) -> Path:
    """Write a KoGPT2-format directory (config.json, model weights, tokenizer.json) and return it."""
    texts = [("긍정 " if label else "부정 ") + doc for doc, label in sample_reviews()]
    tokenizer = train_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
