"""The token embedding that reads its rows from the checkpoint at lookup (a tied int8 model whose lm_head fbgemm
packed): every vector bit for bit the resident Int8Embedding's, from every format and stored dtype, whatever the
file does after the load."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import core.int8_rows
from core.gpt2_decode import decode_batch
from core.gpt2_model import build
from core.int8_rows import FileInt8Embedding, Int8Embedding, RowInt8Linear, quantize_rows
from core.model_loading import directory_weights, load_config, load_model, read_state_dict
from core.settings import ModelSettings
from core.weight_files import CheckpointChanged, StoredTensor, safetensors_file

FBGEMM = RowInt8Linear(torch.randn(4, 4), None).packed is not None
IDS = [torch.tensor([0, 7, 2999, 7]), torch.tensor([[1500, 1500, 3], [7, 0, 2]]), torch.tensor([5]),
       torch.tensor([], dtype=torch.long), torch.arange(3000)]


def _weights(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(3000, 48, generator=gen) * torch.rand(3000, 1, generator=gen) * 5
    weight[7] = 0  # a zero row keeps a finite scale
    weight[2] = -1e-30  # rounds to -0.0 levels: the lookup must not keep the sign of zero
    return weight.to(dtype)


def _stored(kind: str, weight: torch.Tensor, tmp_path: Path) -> StoredTensor:
    if kind == "safetensors":
        save_file({"w": weight}, str(tmp_path / "w.safetensors"))
        return safetensors_file(tmp_path / "w.safetensors")["w"]
    torch.save({"w": weight}, tmp_path / "w.bin")
    return read_state_dict(tmp_path / "w.bin")["w"]


def _file_embedding(stored: StoredTensor) -> tuple[FileInt8Embedding, Int8Embedding]:
    values, scale = quantize_rows(*stored.shape, stored.rows)
    return FileInt8Embedding(stored.pick, scale, stored.shape[1], lambda: values), Int8Embedding(values, scale)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)  # equal bits, the sign of zero included


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_lookup_is_bit_for_bit_the_int8_embeddings(kind: str, dtype: torch.dtype, tmp_path: Path):
    weight = _weights(dtype)
    embedding = _file_embedding(_stored(kind, weight, tmp_path))[0]
    reference = Int8Embedding.from_float(weight)
    assert torch.equal(embedding.weight_scale, reference.weight_scale)
    for ids in IDS:
        got = embedding(ids)
        assert got.shape == (*ids.shape, 48) and got.dtype == torch.float32
        assert torch.equal(_bits(got), _bits(reference(ids))), ids
    assert not embedding(torch.tensor([7])).any()
    with torch.inference_mode():  # as the decoder calls it
        assert torch.equal(_bits(embedding(IDS[1])), _bits(reference(IDS[1])))


def test_an_id_outside_the_vocabulary_is_an_index_error(tmp_path: Path):
    embedding = _file_embedding(_stored("safetensors", _weights(torch.float32), tmp_path))[0]
    for bad in (3000, -1):
        with pytest.raises(IndexError, match=f"token id {bad} is outside"):
            embedding(torch.tensor([5, bad]))


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_a_file_replaced_by_a_rename_or_deleted_is_still_read_as_loaded(kind: str, tmp_path: Path):
    weight = _weights(torch.float32)
    embedding, reference = _file_embedding(_stored(kind, weight, tmp_path))
    path = next(tmp_path.iterdir())
    other = tmp_path / "other"
    (torch.save({"w": weight + 1}, other) if kind == "bin" else save_file({"w": weight + 1}, str(other)))
    os.replace(other, path)
    assert torch.equal(_bits(embedding(IDS[1])), _bits(reference(IDS[1])))
    path.unlink()
    assert torch.equal(_bits(embedding(IDS[0])), _bits(reference(IDS[0])))
    assert embedding.resident is None  # still reading the file


def test_a_file_written_in_place_is_refused_by_a_clear_exception(tmp_path: Path):
    stored = _stored("safetensors", _weights(torch.float32), tmp_path)
    path = tmp_path / "w.safetensors"
    stat = path.stat()
    with path.open("r+b") as f:  # same size, other bytes, a later modification time
        f.seek(stat.st_size - 4)
        f.write(b"\x00\x00\x80\x7f")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(CheckpointChanged, match="w.safetensors was written to since the model was loaded"):
        stored.pick(torch.tensor([1, 2]))
    with path.open("r+b") as f:
        f.truncate(stat.st_size // 2)
    with pytest.raises(CheckpointChanged, match=f"w.safetensors ends at byte {stat.st_size // 2}"):
        stored.pick(torch.tensor([2999]))


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_after_the_file_changed_the_rows_come_from_the_head_and_stay_exact(kind: str, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture):
    weight = _weights(torch.float32)
    embedding, reference = _file_embedding(_stored(kind, weight, tmp_path))
    path = next(tmp_path.iterdir())
    with path.open("r+b") as f:  # truncated in place: a mapped file would end the process with SIGBUS if touched
        f.truncate(path.stat().st_size - 1000)
    with caplog.at_level(logging.WARNING, logger="core.int8_rows"):
        assert torch.equal(_bits(embedding(IDS[1])), _bits(reference(IDS[1])))
    assert embedding.resident is not None and "the token embedding takes its rows from the lm_head" in caplog.text
    assert torch.equal(_bits(embedding(IDS[4])), _bits(reference(IDS[4])))


def test_rows_changed_with_the_same_size_and_time_are_caught_by_their_scale(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture):
    weight = _weights(torch.float32)
    embedding, reference = _file_embedding(_stored("safetensors", weight, tmp_path))
    path = tmp_path / "w.safetensors"
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-48 * 4:] = (weight[-1] * 3).numpy().tobytes()  # the last row, three times as large
    with path.open("r+b") as f:
        f.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as if nothing had happened
    with caplog.at_level(logging.WARNING, logger="core.int8_rows"):
        assert torch.equal(_bits(embedding(torch.tensor([2999]))), _bits(reference(torch.tensor([2999]))))
    assert "rows read again differ from the loaded ones" in caplog.text


def test_lookups_from_several_threads_read_their_own_rows(tmp_path: Path):
    """pread has no shared file position: threads looking up at once each get their rows."""
    embedding, reference = _file_embedding(_stored("safetensors", _weights(torch.float32), tmp_path))
    failures: list[int] = []

    def look_up(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(50):
            ids = torch.randint(0, 3000, (16,), generator=gen)
            if not torch.equal(embedding(ids), reference(ids)):
                failures.append(seed)

    threads = [threading.Thread(target=look_up, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def _resident(state: dict[str, StoredTensor]) -> list[tuple[str, StoredTensor]]:
    """The same weights, with no way to read rows again: the build keeps the resident Int8Embedding."""
    return [(key, dataclasses.replace(stored, pick=None)) for key, stored in state.items()]


@pytest.mark.skipif(not FBGEMM, reason="without fbgemm the lm_head reads the embedding's own int8 matrix")
@pytest.mark.parametrize("file", ["safetensors", "bin"])
def test_a_tied_model_keeps_no_second_int8_matrix_and_generates_the_same(file: str, tiny_dir: Path, trained,
                                                                        tmp_path: Path):
    state = {k: v.clone() for k, v in trained.state_dict().items() if k != "lm_head.weight"}
    (save_file(state, str(tmp_path / "w.safetensors")) if file == "safetensors" else torch.save(state, tmp_path / "w.bin"))
    config = load_config(str(tiny_dir))
    weights = read_state_dict(next(tmp_path.iterdir()))
    model, resident = build(config, weights.items(), True), build(config, _resident(weights), True)
    assert isinstance(resident.transformer.wte, Int8Embedding)
    embedding = model.transformer.wte
    assert isinstance(embedding, FileInt8Embedding) and embedding.embedding_dim == config.n_embd
    assert embedding.num_embeddings == config.vocab_size and "rows read from" in repr(embedding)
    matrices = [t for t in (*model.buffers(), *model.parameters()) if t.shape == (config.vocab_size, config.n_embd)]
    assert matrices == []  # the packed lm_head holds the only copy
    assert torch.equal(model.lm_head.int8_weight, resident.lm_head.int8_weight)
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    assert torch.equal(model(ids).logits, resident(ids).logits)
    assert torch.equal(model.hidden(ids, torch.tensor([[1] * 5, [1] * 3 + [0] * 2]))[1, :3],
                       resident.hidden(ids, torch.tensor([[1] * 5, [1] * 3 + [0] * 2]))[1, :3])
    ours, theirs = decode_batch(model), decode_batch(resident)
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5, 4]]
    a, b = ours.prefill(prompts, [2, 1]), theirs.prefill(prompts, [2, 1])
    for _ in range(8):  # greedy: the same tokens, the same logits
        assert torch.equal(a, b)
        tokens = a.argmax(dim=1).tolist()
        a, b = ours.step(tokens), theirs.step(tokens)
    assert torch.equal(a, b)


@pytest.mark.skipif(not FBGEMM, reason="without fbgemm the lm_head reads the embedding's own int8 matrix")
def test_the_bot_serves_a_model_directory_with_its_embedding_read_from_the_file(tiny_dir: Path):
    model = load_model(ModelSettings(pretrained=str(tiny_dir), quantize="int8")).model
    assert isinstance(model.get_input_embeddings(), FileInt8Embedding)
    resident = build(model.config, _resident(directory_weights(tiny_dir)), True)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.equal(model(ids).logits, resident(ids).logits)


def test_the_embedding_is_read_first_whatever_the_files_order(tiny_dir: Path):
    """Packing the tied int8 head needs two more copies of its matrix for a moment: before the other layers load,
    that moment is not the load's peak."""
    order: list[str] = []
    state = directory_weights(tiny_dir)

    def spied(key: str, stored: StoredTensor) -> StoredTensor:
        def read(begin: int, end: int) -> torch.Tensor:
            order.append(key)
            return stored.read(begin, end)
        return dataclasses.replace(stored, read=read)

    items = sorted((key, spied(key, stored)) for key, stored in state.items())  # the embedding last
    assert items[-1][0] == "transformer.wte.weight"
    assert build(load_config(str(tiny_dir)), items, True) is not None
    assert order[0] == "transformer.wte.weight" and len(set(order)) == len(state)


def test_a_file_too_short_for_its_header_is_refused_before_reading_it(tmp_path: Path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="w.safetensors: not a safetensors file"):
        safetensors_file(path)
    path.write_bytes((1000).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="w.safetensors: the header is truncated"):
        safetensors_file(path)


def test_without_fbgemm_or_untied_the_embedding_stays_resident_and_shared(tiny_dir: Path, trained,
                                                                          monkeypatch: pytest.MonkeyPatch):
    """torch._int_mm's head reads the embedding's own int8 matrix (one copy); an untied head has its own weights."""
    config = load_config(str(tiny_dir))
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    stored = {k: StoredTensor(tuple(v.shape), lambda b, e, v=v: v[b:e].clone(), pick=lambda ids, v=v: v[ids])
              for k, v in state.items() if k != "lm_head.weight"}
    with monkeypatch.context() as patch:
        patch.setattr(core.int8_rows, "_FBGEMM_LINEAR", None)
        model = build(config, stored.items(), True)
    embedding = model.transformer.wte
    assert isinstance(embedding, Int8Embedding) and model.lm_head.packed is None
    assert model.lm_head.weight_int8 is embedding.weight_int8
    untied = config.__class__.from_dict({**config.to_dict(), "tie_word_embeddings": False})
    head = StoredTensor(tuple(state["lm_head.weight"].shape), lambda b, e: state["lm_head.weight"][b:e].clone() * 2)
    model = build(untied, [*stored.items(), ("lm_head.weight", head)], True)
    assert isinstance(model.transformer.wte, Int8Embedding)
    assert not torch.equal(model.lm_head.weight_scale, model.transformer.wte.weight_scale)
