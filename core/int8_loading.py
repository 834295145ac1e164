"""GPT-2 quantized to int8 while its weights are read, so the float32 model never exists as a whole: the peak is the
int8 model plus one layer being read (the token embedding is quantized a block of rows at a time)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from core.int8_rows import Int8Embedding, RowInt8Linear, quantize_rows
from core.memory import large_blocks_returned
from core.speedups import quantize_int8
from core.weight_files import StoredTensor, safetensors_file

EMBEDDING, HEAD = "transformer.wte.weight", "lm_head.weight"


def load_int8_streaming(directory: Path, config: GPT2Config) -> nn.Module | None:
    """GPT-2 from a directory of safetensors weights. None when the directory has no safetensors weights or the
    model needs something this loader does not provide."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None

    def tensors() -> Iterable[tuple[str, StoredTensor]]:
        for file in files:
            yield from safetensors_file(file).items()

    return build_int8(config, tensors())


def build_int8(config: GPT2Config, tensors: Iterable[tuple[str, StoredTensor]]) -> nn.Module | None:
    """The int8 model from `tensors` (a GPT2LMHeadModel's or a base GPT2Model's names), each read and quantized in
    turn; keys the model does not have (buffers older transformers saved) are skipped. None when a weight is missing."""
    with large_blocks_returned():
        return _build(config, tensors)


def _build(config: GPT2Config, tensors: Iterable[tuple[str, StoredTensor]]) -> nn.Module | None:
    with torch.device("meta"):
        model = GPT2LMHeadModel(config).eval()
    expected = set(model.state_dict())
    convs = {name for name, module in model.named_modules() if isinstance(module, Conv1D)}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, stored in tensors:
        key = key if key in expected else f"transformer.{key}"  # a base GPT2Model's weights have no prefix
        if key not in expected or (key == HEAD and config.tie_word_embeddings):
            stored.drop()
            continue  # an old causal-mask buffer, or a tied lm_head's copy of the embedding (the tie wins)
        if key == EMBEDDING:
            values, scale = quantize_rows(*stored.shape, stored.rows)  # never whole in float32 (157 MB for KoGPT2)
            stored.drop()
            model.set_input_embeddings(Int8Embedding(values, scale))
            continue
        path, _, leaf = key.rpartition(".")
        tensor = stored.load()
        if path not in convs:
            module = model.get_submodule(path)
            if leaf in dict(module.named_buffers(recurse=False)):
                module.register_buffer(leaf, tensor)
            else:
                setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))
            continue
        parts = pending.setdefault(path, {})
        parts[leaf] = tensor
        if len(parts) == 2:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, RowInt8Linear(parts["weight"].t(), parts["bias"]))
            del pending[path]
    embedding = model.get_input_embeddings()
    if config.tie_word_embeddings and isinstance(embedding, Int8Embedding):
        model.set_output_embeddings(RowInt8Linear.from_int8(embedding.weight_int8, embedding.weight_scale, None))
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta and name.endswith("attn.bias"):  # GPT-2's causal mask in older transformers
            n = buffer.shape[-1]
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent).register_buffer(
                leaf, torch.tril(torch.ones(n, n, dtype=torch.bool)).view(buffer.shape), persistent=False
            )
    if pending or any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None
    return quantize_int8(model)  # what is left: an untied lm_head (an nn.Linear)
