"""The int8 token embedding and the streamed loading of every checkpoint format: the same numbers as quantizing the
float32 model after loading it, without ever holding the float32 model or the whole file."""

from __future__ import annotations

import asyncio
import copy
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_settings, running_engine
from safetensors.torch import save_file
from tiny_model import write_lightning_ckpt
from transformers import GPT2LMHeadModel

import core.engine
import core.model_loading
from core.errors import ModelLoadError
from core.grammar import parse_gen
from core.int8_rows import FileInt8Embedding, Int8Embedding, RowInt8Linear, quantize_rows
from core.memory import drop_mapped_pages
from core.model_loading import load_model
from core.settings import ModelSettings
from core.speedups import fuse_gelu, quantize_int8

IDS = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])


def _reference(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """What the bot served before streaming: the float32 model, then quantized."""
    copy = GPT2LMHeadModel(model.config)
    copy.load_state_dict(model.state_dict())
    return quantize_int8(fuse_gelu(copy.eval()))


def test_int8_embedding_rows_are_the_int8_values_times_the_row_scale():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3000, 48, generator=gen) * torch.rand(3000, 1, generator=gen) * 5
    weight[7] = 0  # a zero row keeps a finite scale
    embedding = Int8Embedding.from_float(weight)
    values, scale = embedding.weight_int8, embedding.weight_scale
    assert values.dtype == torch.int8 and values.abs().max() <= 127
    assert torch.equal(scale, (weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127))
    ids = torch.tensor([[0, 7, 2999], [1500, 1500, 3]])
    assert torch.equal(embedding(ids), values[ids].float() * scale[ids][..., None])
    assert torch.equal(embedding(ids)[1, 0], embedding(torch.tensor([1500]))[0])  # a row alone equals it in a batch
    assert not embedding(ids)[0, 1].any()
    assert (embedding.dequantized() - weight).abs().max() <= scale.max() / 2 * 1.0001  # within half a step per row


def test_blocks_of_rows_quantize_as_the_whole_matrix_does():
    weight = torch.randn(2500, 40)
    whole = quantize_rows(2500, 40, lambda begin, end: weight[begin:end])
    layer = RowInt8Linear(weight, None)
    assert torch.equal(whole[0], layer.int8_weight) and torch.equal(whole[1], layer.weight_scale)


def test_tied_lm_head_reads_the_embeddings_int8_rows(tiny_dir: Path):
    model = quantize_int8(GPT2LMHeadModel.from_pretrained(tiny_dir).eval())
    embedding, head = model.get_input_embeddings(), model.lm_head
    assert isinstance(embedding, Int8Embedding) and isinstance(head, RowInt8Linear)
    assert torch.equal(head.int8_weight, embedding.weight_int8) and torch.equal(head.weight_scale, embedding.weight_scale)
    assert not any(type(m) is torch.nn.Embedding and m is embedding for m in model.modules())


def _formats(model: GPT2LMHeadModel, directory: Path) -> dict[str, tuple[Path, GPT2LMHeadModel]]:
    """Each checkpoint format the bot loads, and the model whose weights it holds."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stepped = copy.deepcopy(model)  # writing a Lightning checkpoint takes an optimizer step
    formats = {"ckpt": (write_lightning_ckpt(stepped, directory / "epoch=1-val_loss=3.00.ckpt"), stepped)}
    torch.save(state, directory / "weights.bin")
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, str(directory / "weights.safetensors"))
    model.save_pretrained(directory / "hf")
    for name, path in {"bin": "weights.bin", "safetensors": "weights.safetensors",
                       "hf": "hf"}.items():
        formats[name] = (directory / path, model)
    return formats


def test_every_format_loads_int8_with_the_logits_of_quantizing_the_float32_model(tiny_dir: Path, trained, tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch):
    """And none of them builds the float32 model: transformers' class is never used, and core.gpt2_model's tree is
    filled weight by weight (its layers quantized as they are read)."""
    def refuse() -> None:
        raise AssertionError("transformers' GPT2LMHeadModel was used")

    formats = _formats(trained, tmp_path)
    monkeypatch.setattr(core.model_loading, "_transformers_gpt2", refuse)
    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", None)
    for name, (path, weights) in formats.items():
        expected = _reference(weights)(input_ids=IDS).logits
        model = load_model(ModelSettings(pretrained=str(tiny_dir), checkpoint=str(path), quantize="int8")).model
        # A packed (fbgemm) tied head holds the int8 rows: the embedding reads its own from the file at lookup.
        kind = FileInt8Embedding if model.lm_head.packed is not None else Int8Embedding
        assert isinstance(model.get_input_embeddings(), kind), name
        assert torch.equal(model(input_ids=IDS).logits, expected), name


def test_every_format_loads_float32_with_the_saved_weights(tiny_dir: Path, trained, tmp_path: Path):
    for name, (path, weights) in _formats(trained, tmp_path).items():
        model = load_model(ModelSettings(pretrained=str(tiny_dir), checkpoint=str(path), quantize="none")).model
        assert torch.equal(model(input_ids=IDS).logits, fuse_gelu(weights.eval())(input_ids=IDS).logits), name


def test_a_lightning_checkpoint_is_memory_mapped_not_read_whole(tiny_dir: Path, trained, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    calls = []
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    path = write_lightning_ckpt(trained, tmp_path / "epoch=1-val_loss=3.00.ckpt")
    load_model(ModelSettings(pretrained=str(tiny_dir), checkpoint=str(path), quantize="int8"))
    assert calls == [True]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_dropped_pages_leave_the_process_and_the_tensor_reads_the_same(tmp_path: Path):
    original = torch.randn(2048, 1024)  # 8 MB
    torch.save({"w": original}, tmp_path / "w.bin")
    mapped = torch.load(tmp_path / "w.bin", mmap=True, weights_only=True)["w"]
    assert torch.equal(mapped, original)  # every page read
    assert _resident_kb(tmp_path / "w.bin") >= 8 * 1024
    drop_mapped_pages(mapped)
    assert _resident_kb(tmp_path / "w.bin") < 64
    assert torch.equal(mapped, original)  # read again from the file


def _resident_kb(path: Path) -> int:
    """Resident kB of this process's mappings of `path`."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


async def test_the_engine_gives_freed_memory_back_once_it_is_idle(tiny_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    trims = asyncio.Event()
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(core.engine, "return_freed_memory", lambda: loop.call_soon_threadsafe(trims.set))
    async with running_engine(make_settings(tiny_dir, tmp_path)) as engine:
        trims.clear()
        request = parse_gen("긍정 아 정말 max_length=12", engine.defaults, engine.limits)
        await engine.generate(engine.prepare(request))
        await asyncio.wait_for(trims.wait(), 30)


def test_a_truncated_safetensors_checkpoint_is_one_sentence_before_anything_is_read(tiny_dir: Path, trained,
                                                                                     tmp_path: Path):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.clone() for k, v in trained.state_dict().items() if k != "lm_head.weight"}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    for quantize in ("int8", "none"):
        with pytest.raises(ModelLoadError, match="safetensors.*truncated"):
            load_model(ModelSettings(pretrained=str(tiny_dir), checkpoint=str(path), quantize=quantize))


def test_old_causal_mask_buffers_in_a_safetensors_checkpoint_are_skipped(tiny_dir: Path, trained, tmp_path: Path):
    """Older transformers saved each layer's boolean causal mask; the model rebuilds it."""
    state = {k: v.clone() for k, v in trained.state_dict().items() if k != "lm_head.weight"}
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.bool))
    save_file(state, str(tmp_path / "old.safetensors"))
    model = load_model(ModelSettings(pretrained=str(tiny_dir), checkpoint=str(tmp_path / "old.safetensors"))).model
    assert torch.equal(model(input_ids=IDS).logits, _reference(trained)(input_ids=IDS).logits)
