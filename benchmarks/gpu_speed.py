"""The engine on a GPU against transformers' own batched `generate` on the same GPU, side by side in one run.

    python benchmarks/gpu_speed.py                  # on a machine with a CUDA GPU
    python benchmarks/gpu_speed.py --device cpu --concurrent 4 --new-tokens 8   # a smoke run anywhere (on a CPU
                                                    # the engine is int8 and generate fp32: not a comparison)

Model: a random GPT-2 with skt/kogpt2-base-v2's shape (as benchmarks/engine_speed.py builds it). Rows:
  engine: (a) one request's ms/token; (b) `--concurrent` requests at once, each with its own knobs;
  generate: (b) the same prompts in one `model.generate` batch (left-padded) with one knob set, bf16 like the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from engine_speed import PROMPT_WORDS, build_model  # noqa: E402 (after the path set-up above)


def prompts(count: int) -> list[str]:
    return [("긍정 " if i % 2 == 0 else "부정 ") + PROMPT_WORDS[i % len(PROMPT_WORDS)] for i in range(count)]


def knobs_for(i: int, prompt_tokens: int, new_tokens: int):
    from core.knobs import Knobs

    total = prompt_tokens + new_tokens
    return Knobs(min_length=total, max_length=total, top_p=[1.0, 0.95, 0.9, 0.8][i % 4], top_k=[1, 5, 20, 50][i % 4],
                 repetition_penalty=[1.0, 1.2][i % 2], no_repeat_ngram_size=0, temperature=[1.0, 0.7, 1.3][i % 3],
                 seed=i)


async def run_engine(model_dir: Path, device: str, concurrent: int, new_tokens: int) -> dict:
    from core.engine import start_engine
    from core.grammar import GenRequest
    from core.settings import load_settings

    settings = load_settings(model={"pretrained": str(model_dir), "device": device},
                             limits={"max_batch_size": concurrent, "queue_size": concurrent, "max_length": 1024,
                                     "max_prompt_tokens": 64, "max_candidates": 1, "request_timeout_s": 600})
    engine = await start_engine(settings)

    def request(i: int, text: str) -> GenRequest:
        label, _, prompt = text.partition(" ")
        count = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        return GenRequest(label=label, prompt=prompt, knobs=knobs_for(i, count, new_tokens))

    texts = prompts(concurrent)
    await engine.generate(request(0, texts[0]))  # warm-up
    started = time.perf_counter()
    await engine.generate(request(3, texts[0]))
    single = (time.perf_counter() - started) / new_tokens * 1000
    started = time.perf_counter()
    results = await asyncio.gather(*(engine.generate(request(i, t)) for i, t in enumerate(texts)))
    burst = time.perf_counter() - started
    source = engine.source
    await engine.stop()
    return {"source": source, "ms_per_token": single, "burst_s": burst, "tokens": sum(r.new_tokens for r in results)}


def run_generate(model_dir: Path, device: str, concurrent: int, new_tokens: int) -> dict:
    import torch
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from core.devices import model_dtype, resolve_device

    target = resolve_device(device)
    model = GPT2LMHeadModel.from_pretrained(model_dir).to(target, model_dtype(target)).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts(concurrent), return_tensors="pt", padding=True).to(target)
    options = {"do_sample": True, "top_k": 50, "top_p": 1.0, "min_new_tokens": new_tokens,
               "max_new_tokens": new_tokens, "pad_token_id": tokenizer.eos_token_id}
    with torch.inference_mode():
        model.generate(**batch, **{**options, "min_new_tokens": 2, "max_new_tokens": 2})  # warm-up
        if target.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(**batch, **options)
        if target.type == "cuda":
            torch.cuda.synchronize()
    return {"burst_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu", "auto"))
    parser.add_argument("--concurrent", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "kogpt2-shape"
        print("building a random GPT-2 with kogpt2-base-v2's shape …", flush=True)
        build_model(model_dir)
        engine = asyncio.run(run_engine(model_dir, args.device, args.concurrent, args.new_tokens))
        generate = run_generate(model_dir, args.device, args.concurrent, args.new_tokens)
    print(f"\nmodel: {engine['source']}")
    print(f"engine, one request: {engine['ms_per_token']:.1f} ms/token")
    print(f"engine, {args.concurrent} requests with their own knobs: {engine['burst_s']:.2f} s")
    print(f"transformers generate, one batch of {args.concurrent} with one knob set: {generate['burst_s']:.2f} s "
          f"(engine / generate = {engine['burst_s'] / generate['burst_s']:.2f}x)")


if __name__ == "__main__":
    main()
