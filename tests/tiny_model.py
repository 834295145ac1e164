"""Tiny KoGPT2-format models for tests: a BPE tokenizer trained on NSMC reviews, random GPT-2 weights."""

from __future__ import annotations

import argparse
import math
import os
import sys
import types
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from core.training.data import read_nsmc
from core.training.tokenizer import train_tokenizer

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
    # GPT-2's head size, 64 (128 / 2 heads): the decode path's bit-exactness across batches rests on the float32
    # kernels' behaviour at that size (at 16, this torch rounds attention over 16 and 32 columns differently).
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=128, n_layer=2, n_head=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_end_likely(model: GPT2LMHeadModel, eos_id: int, p_end: float = 0.1, top_k: int = 50) -> GPT2LMHeadModel:
    """A bias on end-of-text's logit: about `p_end` of the probability among the `top_k` tokens a row samples from
    (the tiny model's logits are nearly flat), so rows end at different steps whatever vocabulary it learned."""
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight = model.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[eos_id] = math.log(p_end / (1 - p_end) * (top_k - 1))
    model.lm_head = head
    return model


def write_lightning_ckpt(model: GPT2LMHeadModel, path: Path) -> Path:
    """A checkpoint shaped like PyTorch Lightning's: prefixed weights, optimizer state, pickled hyper-parameters."""
    # Lightning's AttributeDict lives in a module we do not install; fake the module only while pickling.
    module = types.ModuleType("pytorch_lightning.utilities.parsing")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__ = module.__name__
    AttributeDict.__qualname__ = "AttributeDict"
    module.AttributeDict = AttributeDict
    fakes = {"pytorch_lightning": types.ModuleType("pytorch_lightning"),
             "pytorch_lightning.utilities": types.ModuleType("pytorch_lightning.utilities"),
             module.__name__: module}
    sys.modules.update(fakes)
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
        model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
        optimizer.step()
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        # Older transformers saved these buffers; today's GPT-2 rebuilds them.
        state["model.transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
        ckpt = {
            "epoch": 2,
            "global_step": 1234,
            "pytorch-lightning_version": "1.2.0",
            "state_dict": state,
            "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(3.1), "best_model_path": "x.ckpt"}},
            "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [scheduler.state_dict()],
            "hparams_name": "hparams",
            "hyper_parameters": AttributeDict(
                lr=5e-5, batch_size=32, args=argparse.Namespace(pretrained_model_name="skt/kogpt2-base-v2", max_seq_length=32)
            ),
        }
        torch.save(ckpt, path)
    finally:
        for name in fakes:
            del sys.modules[name]
    return path
