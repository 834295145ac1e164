"""What a token-embedding lookup costs when its rows are read from the checkpoint (`FileInt8Embedding`, a tied int8
model whose lm_head fbgemm packed) instead of a resident int8 matrix (`Int8Embedding`), side by side in one run.

    python benchmarks/embedding_lookup.py          # ~20 s

KoGPT2-base's embedding shape (51,200 × 768, random float32 weights) written as safetensors and as a `.bin`
(`torch.load(mmap=True)`); lookups of 1 id (a decode step of one row), 16 distinct ids (a step of 16 rows) and 300
(a prefill), one thread, medians of interleaved rounds. Every lookup's result is checked equal to the resident one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.int8_rows import FileInt8Embedding, Int8Embedding
from core.model_loading import read_state_dict
from core.weight_files import safetensors_file

VOCAB, WIDTH = 51200, 768


def _median_us(embedding: torch.nn.Module, ids: torch.Tensor, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        embedding(ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    weight = torch.randn(VOCAB, WIDTH) * torch.rand(VOCAB, 1)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        save_file({"w": weight}, f"{tmp}/w.safetensors")
        torch.save({"w": weight}, f"{tmp}/w.bin")
        resident = Int8Embedding.from_float(weight)
        values, scale = resident.weight_int8, resident.weight_scale
        embeddings = {"resident int8": resident}
        for name, stored in (("safetensors", safetensors_file(Path(tmp) / "w.safetensors")["w"]),
                             (".bin (mmap)", read_state_dict(Path(tmp) / "w.bin")["w"])):
            embeddings[name] = FileInt8Embedding(stored.pick, scale, WIDTH, lambda: values)
        gen = torch.Generator().manual_seed(0)
        sizes = {1: "1 id (a step, 1 row)", 16: "16 ids (a step, 16 rows)", 300: "300 ids (a prefill)"}
        timings: dict[tuple[int, str], list[float]] = {}
        for _ in range(args.rounds):
            for n in sizes:
                ids = torch.randperm(VOCAB, generator=gen)[:n]
                expected = embeddings["resident int8"](ids)
                for name, embedding in embeddings.items():
                    assert torch.equal(embedding(ids), expected), name
                    timings.setdefault((n, name), []).append(_median_us(embedding, ids, args.calls))
    print(f"{'lookup':<26}" + "".join(f"{name:>22}" for name in embeddings))
    for n, label in sizes.items():
        base = statistics.median(timings[(n, "resident int8")])
        cells = []
        for name in embeddings:
            us = statistics.median(timings[(n, name)])
            cells.append(f"{us:8.1f} µs" + (f" ({us - base:+.0f})" if name != "resident int8" else ""))
        print(f"{label:<26}" + "".join(f"{cell:>22}" for cell in cells))
    print(f"\nmedians of {args.rounds} interleaved rounds of {args.calls} calls, 1 thread")


if __name__ == "__main__":
    main()
