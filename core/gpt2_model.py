"""GPT-2 for CPU serving as a plain torch module tree, without transformers' modeling code.

Importing transformers' GPT-2 class pulls in its whole modeling stack (torch.distributed, torch._dynamo, sympy, …):
about 140 MB of a process that serves a 125 MB model. The tree here has exactly the checkpoint's names
(transformer.wte/wpe/h[i].ln_1/attn.c_attn/attn.c_proj/ln_2/mlp.c_fc/mlp.c_proj/ln_f, lm_head) and carries the
config (core/gpt2_config.py's, or transformers' GPT2Config), so core/gpt2_decode.py decodes it as it would
transformers' model. Its layers are float32 (`quantize = "none"`: `Linear1D`, transformers' `Conv1D` computation, the
same kernel call) or int8 (core/int8_rows.py). Nothing here imports transformers but `as_transformers`.

`GPT2LM.forward` is the full-sequence pass that scoring needs (core/rerank.py, core/logprobs.py, evaluation's NLL):
each row over its own tokens with the same operations transformers ran for it (its SDPA attention, one row at a
time where a batch is padded, as core/speedups.py made it), so the scores are those of the previous releases.
`as_transformers` wraps the same modules in transformers' GPT2LMHeadModel where its `generate` is wanted."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from core.gpt2_config import transformers_config
from core.int8_rows import FileInt8Embedding, Int8Embedding, RowInt8Linear, quantize_rows
from core.linear1d import Linear1D
from core.linear1d import empty as _empty
from core.memory import large_blocks_returned
from core.weight_files import StoredTensor

if TYPE_CHECKING:  # a GPT2Config, or core/gpt2_config.py's GPT2Settings (the same attributes, no transformers import)
    from transformers import GPT2Config

EMBEDDING, HEAD = "transformer.wte.weight", "lm_head.weight"
# transformers' names for the activations this tree computes with the same torch kernel (`gelu_new` is the tanh
# formula written out; core.speedups' fuse_gelu served it as torch's one-kernel tanh GELU, as here).
_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def serves(config: GPT2Config) -> bool:
    """Whether this tree computes what transformers' GPT-2 does for `config` (else the loader uses transformers)."""
    return (getattr(config, "model_type", "gpt2") == "gpt2" and config.activation_function in _ACTIVATIONS
            and not config.add_cross_attention and not config.reorder_and_upcast_attn)


@dataclass
class LMOutput:
    logits: torch.Tensor


def _layer_norm(config: GPT2Config) -> nn.LayerNorm:
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, device="meta")


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, index: int):
        super().__init__()
        n = config.n_embd
        self.c_attn, self.c_proj = Linear1D(3 * n, n), Linear1D(n, n)
        self.heads = config.n_head
        self.scaling = (n // self.heads) ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(index + 1)

    def forward(self, x: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:
        """Causal self-attention of right-padded rows (rows × width × embedding), each run of rows (first, end, length)
        over its own tokens: transformers' SDPA call as core.speedups cut it per run (SDPA's CPU kernel computes each
        (row, head) by itself, so a row's result does not depend on the others). Padding positions come out as 0."""
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=2)
        q, k, v = (t.view(*t.shape[:-1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = q.new_zeros(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])  # rows × width × heads × head size
        for begin, end, n in runs:
            part = nn.functional.scaled_dot_product_attention(q[begin:end, :, :n], k[begin:end, :, :n],
                                                              v[begin:end, :, :n], scale=self.scaling, is_causal=n > 1)
            out[begin:end, :n] = part.transpose(1, 2)
        return self.c_proj(out.reshape(*x.shape[:-1], -1))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc, self.c_proj = Linear1D(inner, config.n_embd), Linear1D(config.n_embd, inner)
        self.act = nn.GELU(approximate=_ACTIVATIONS[config.activation_function])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, index: int):
        super().__init__()
        self.ln_1 = _layer_norm(config)
        self.attn = Attention(config, index)
        self.ln_2 = _layer_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:
        x = self.attn(self.ln_1(x), runs) + x
        return x + self.mlp(self.ln_2(x))


class Body(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd, _weight=_empty(config.vocab_size, config.n_embd))
        self.wpe = nn.Embedding(config.n_positions, config.n_embd, _weight=_empty(config.n_positions, config.n_embd))
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = _layer_norm(config)


class GPT2LM(nn.Module):
    """GPT-2 with its language-model head; inference only. Made empty (meta weights): `build` fills it."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = Body(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False, device="meta")

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.wte

    def set_input_embeddings(self, module: nn.Module) -> None:
        self.transformer.wte = module

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, module: nn.Module) -> None:
        self.lm_head = module

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> LMOutput:
        """Every position's next-token logits (float32): `lm_head` over `hidden`."""
        return LMOutput(self.lm_head(self.hidden(input_ids, attention_mask)).float())

    @torch.inference_mode()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Every position's final hidden state (after `ln_f`, before `lm_head`) of rows right-padded to a common
        width (`attention_mask`: 1 for a row's tokens, then 0s; the states at padding mean nothing). Every operation
        but attention works on each token by itself, over the whole padded batch as transformers ran it (float32 matrix products can round
        a row differently with the number of rows: the same shapes give the previous releases' numbers); attention
        runs over each row's own tokens."""
        rows, width = input_ids.shape
        lengths = [width] * rows
        if attention_mask is not None:
            lengths = attention_mask.sum(dim=1).tolist()
            expected = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
            if not torch.equal(attention_mask.bool().cpu(), expected):
                raise ValueError("attention_mask must mark each row's tokens from its first column on (right padding)")
        runs: list[tuple[int, int, int]] = []  # (first row, end row, length) of neighbouring rows of one length
        for row, n in enumerate(lengths):
            if runs and runs[-1][2] == n:
                runs[-1] = (runs[-1][0], row + 1, n)
            elif n:
                runs.append((row, row + 1, n))
        x = self.transformer.wte(input_ids) + self.transformer.wpe(torch.arange(width))[None]
        for block in self.transformer.h:
            x = block(x, runs)
        return self.transformer.ln_f(x)


def build(config: GPT2Config, tensors: Iterable[tuple[str, StoredTensor]], int8: bool) -> GPT2LM | None:
    """The model from `tensors` (a GPT2LMHeadModel's or a base GPT2Model's names), each read in turn and, with `int8`,
    quantized as it is read (the float32 model never exists whole). Keys the model does not have (buffers older
    transformers saved) are skipped. None when a weight is missing."""
    with large_blocks_returned():
        return _build(config, tensors, int8)


def _build(config: GPT2Config, tensors: Iterable[tuple[str, StoredTensor]], int8: bool) -> GPT2LM | None:
    model = GPT2LM(config).eval()
    expected = set(model.state_dict())
    convs = {name for name, module in model.named_modules() if isinstance(module, Linear1D)}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    named = [(key if key in expected else f"transformer.{key}", stored)  # a base GPT2Model's have no prefix
             for key, stored in tensors]
    # The embedding first: with int8, packing the tied lm_head needs ~2 more copies of its int8 matrix for a moment
    # (KoGPT2-base: ~85 MB), best paid before the other layers are in memory (the load's peak: −75 MB).
    named.sort(key=lambda item: item[0] != EMBEDDING)
    for key, stored in named:
        if key not in expected or (key == HEAD and config.tie_word_embeddings):
            stored.drop()
            continue  # an old causal-mask buffer, or a tied lm_head's copy of the embedding (the tie wins)
        if key == EMBEDDING and int8:
            model.set_input_embeddings(_int8_embedding(model, config, stored))
            continue
        path, _, leaf = key.rpartition(".")
        tensor = stored.load()
        if not int8 or path not in convs:
            setattr(model.get_submodule(path), leaf, nn.Parameter(tensor, requires_grad=False))
            continue
        parts = pending.setdefault(path, {})
        parts[leaf] = tensor
        if len(parts) == 2:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, RowInt8Linear(parts["weight"].t(), parts["bias"]))
            del pending[path]
    embedding, head = model.get_input_embeddings(), model.lm_head
    if config.tie_word_embeddings:
        if not int8 and not embedding.weight.is_meta:
            head.weight = embedding.weight  # (int8: the embedding's load made the head)
    elif int8 and not head.weight.is_meta:
        model.lm_head = RowInt8Linear(head.weight, None)
    if pending or any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None
    return model


def _int8_embedding(model: GPT2LM, config: GPT2Config, stored: StoredTensor) -> nn.Module:
    """The int8 token embedding, quantized a block of rows at a time (never whole in float32: 157 MB for KoGPT2);
    a tied model's lm_head is made here from the same int8 rows. Where fbgemm packs that head (its own copy of the
    rows) and the file can be read again, the embedding reads its rows from the file at lookup instead of keeping a
    second copy (core/int8_rows.py's FileInt8Embedding)."""
    values, scale = quantize_rows(*stored.shape, stored.rows)
    stored.drop()
    if not config.tie_word_embeddings:
        return Int8Embedding(values, scale)
    head = model.lm_head = RowInt8Linear.from_int8(values, scale, None)
    if head.packed is None or stored.pick is None:
        return Int8Embedding(values, scale)  # torch._int_mm's head reads these very values: one copy
    del values
    return FileInt8Embedding(stored.pick, scale, stored.shape[1], lambda: head.int8_weight)


def as_transformers(model: nn.Module) -> nn.Module:
    """transformers' GPT2LMHeadModel over the same modules (no copy), for its `generate` and other tools; a model that
    is one already is returned as it is. Imports transformers' modeling code: never on the serving path."""
    if not isinstance(model, GPT2LM):
        return model
    from transformers import GPT2LMHeadModel

    from core.speedups import rowwise_attention

    with torch.device("meta"):
        wrapped = GPT2LMHeadModel(transformers_config(model.config)).eval()
    for name in ("wte", "wpe", "ln_f"):
        setattr(wrapped.transformer, name, getattr(model.transformer, name))
    for ours, theirs in zip(model.transformer.h, wrapped.transformer.h):
        theirs.ln_1, theirs.ln_2 = ours.ln_1, ours.ln_2
        theirs.attn.c_attn, theirs.attn.c_proj = ours.attn.c_attn, ours.attn.c_proj
        theirs.mlp.c_fc, theirs.mlp.c_proj, theirs.mlp.act = ours.mlp.c_fc, ours.mlp.c_proj, ours.mlp.act
    wrapped.lm_head = model.lm_head
    return rowwise_attention(wrapped)
