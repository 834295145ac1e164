"""Engine speed, measured side by side in one run: the tutorial's path vs the engine (fp32, int8).

    python benchmarks/engine_speed.py            # ~5 minutes on 2 cores

Model: GPT-2 with exactly skt/kogpt2-base-v2's shape (vocab 51200, 1024 positions, 12 layers, 768 hidden, 12 heads),
random weights, built offline; tokenizer trained on NSMC reviews. Workloads:
  (a) one request, 32 new tokens;
  (b) 16 concurrent requests, each with different knobs, 32 new tokens each (min_length = max_length).
Each row runs in its own process (so peak RSS is its own), rows interleaved `--repeats` times, medians reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NEW_TOKENS = 32
CONCURRENT = 16
ROWS = ("tutorial", "engine-fp32", "engine-int8", "engine-int8-1thread")
PROMPT_WORDS = ["아 정말", "이 영화는", "배우들의 연기가", "스토리가 너무", "감독이", "음악이 좋아서", "솔직히 말하면", "처음에는",
                "오랜만에 본", "주인공이", "결말이", "영상미가", "대사가", "시간 가는 줄", "두 번 봐도", "기대했는데"]


def knob_sets() -> list[dict]:
    """16 requests, each with its own knobs (the workload the engine must serve without a common setting)."""
    sets = []
    for i, words in enumerate(PROMPT_WORDS):
        sets.append({
            "prompt": ("긍정 " if i % 2 == 0 else "부정 ") + words,
            "top_k": [1, 5, 20, 50][i % 4],
            "top_p": [1.0, 0.95, 0.9, 0.8][(i // 4) % 4],
            "temperature": [1.0, 0.7, 1.3, 0.9][(i // 2) % 4],
            "repetition_penalty": [1.0, 1.2][i % 2],
            "no_repeat_ngram_size": [0, 0, 3, 2][(i // 3) % 4],
            "seed": i,
        })
    return sets


def build_model(directory: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from core.training.data import read_nsmc
    from core.training.tokenizer import train_tokenizer

    data = ROOT.parent / "shared" / "data" / "nsmc" / "ratings_train.txt"
    rows = read_nsmc(data, 20000) if data.exists() else [("아 정말 재밌다 최고의 영화", 1), ("정말 재미없음", 0)] * 500
    tokenizer = train_tokenizer((("긍정 " if label else "부정 ") + doc for doc, label in rows), 8000)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=51200, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def tutorial_generate(model, tokenizer, spec: dict, length: int):
    """The tutorial's inference path: one `generate` per request with that request's knobs."""
    import torch

    input_ids = tokenizer.encode(spec["prompt"], return_tensors="pt")
    torch.manual_seed(spec["seed"])
    with torch.no_grad():
        out = model.generate(
            input_ids, do_sample=True, top_p=spec["top_p"], top_k=spec["top_k"], temperature=spec["temperature"],
            repetition_penalty=spec["repetition_penalty"], no_repeat_ngram_size=spec["no_repeat_ngram_size"],
            min_length=input_ids.shape[1] + length, max_length=input_ids.shape[1] + length,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0])


def run_tutorial(model_dir: Path) -> dict:
    from core.model_loading import load_model
    from core.settings import ModelSettings

    loaded = load_model(ModelSettings(pretrained=str(model_dir)))
    specs = knob_sets()
    tutorial_generate(loaded.model, loaded.tokenizer, specs[0], 4)  # warm-up
    started = time.perf_counter()
    tutorial_generate(loaded.model, loaded.tokenizer, {**specs[0], "top_k": 50, "top_p": 1.0}, NEW_TOKENS)
    single = time.perf_counter() - started
    started = time.perf_counter()
    for spec in specs:
        tutorial_generate(loaded.model, loaded.tokenizer, spec, NEW_TOKENS)
    return {"a_ms_per_token": single / NEW_TOKENS * 1000, "b_wall_s": time.perf_counter() - started}


def run_engine(model_dir: Path, quantize: str, threads: int = 0) -> dict:
    from core.engine import start_engine
    from core.knobs import Knobs
    from core.settings import load_settings
    from core.types import GenRequest, PreparedRequest

    settings = load_settings(model={"pretrained": str(model_dir), "quantize": quantize, "threads": threads},
                             limits={"max_batch_size": CONCURRENT, "queue_size": 64, "request_timeout_s": 600})

    def request(spec: dict) -> PreparedRequest:
        label, _, prompt = spec["prompt"].partition(" ")
        prompt_len = len(engine.tokenizer(spec["prompt"], add_special_tokens=False)["input_ids"])
        total = prompt_len + NEW_TOKENS
        knobs = Knobs(min_length=total, max_length=total, top_p=spec["top_p"], top_k=spec["top_k"],
                      repetition_penalty=spec["repetition_penalty"], no_repeat_ngram_size=spec["no_repeat_ngram_size"],
                      temperature=spec["temperature"], seed=spec["seed"])
        return engine.prepare(GenRequest(label=label, prompt=prompt, knobs=knobs))

    engine = None

    async def main() -> dict:
        nonlocal engine
        engine = await start_engine(settings)  # as `python -m bot` does
        specs = knob_sets()
        await engine.generate(request(specs[0]))  # warm-up
        started = time.perf_counter()
        single = await engine.generate(request({**specs[0], "top_k": 50, "top_p": 1.0}))
        a = time.perf_counter() - started
        assert single.new_tokens == NEW_TOKENS
        started = time.perf_counter()
        results = await asyncio.gather(*(engine.generate(request(s)) for s in specs))
        b = time.perf_counter() - started
        assert all(r.new_tokens == NEW_TOKENS for r in results)
        await engine.stop()
        return {"a_ms_per_token": a / NEW_TOKENS * 1000, "b_wall_s": b, "max_batch": max_batch(engine)}

    return asyncio.run(main())


def max_batch(engine) -> int:
    """The largest batch-size bucket any engine step fell in (from the Prometheus histogram)."""
    largest = 0
    for metric in engine.telemetry.metrics.batch.collect():
        buckets = sorted((float(s.labels["le"]), s.value) for s in metric.samples if s.name.endswith("_bucket"))
        below = 0.0
        for le, count in buckets:
            if count > below:
                largest = le
            below = count
    return int(largest) if largest != float("inf") else 64


def child(row: str, model_dir: Path) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if row == "tutorial":
        result = run_tutorial(model_dir)
    else:
        quantize = "int8" if "int8" in row else "none"
        result = run_engine(model_dir, quantize, threads=1 if row.endswith("1thread") else 0)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        child(args.row, args.model_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "kogpt2-shape"
        print("building a random GPT-2 with kogpt2-base-v2's shape …", flush=True)
        build_model(model_dir)
        runs: dict[str, list[dict]] = {row: [] for row in ROWS}
        for repeat in range(args.repeats):
            for row in ROWS:
                out = subprocess.run([sys.executable, __file__, "--row", row, "--model-dir", str(model_dir)],
                                     capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                runs[row].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  run {repeat + 1}/{args.repeats} {row}: {runs[row][-1]}", flush=True)
    med = {row: {key: statistics.median(r[key] for r in rs) for key in ("a_ms_per_token", "b_wall_s", "peak_rss_mb")}
           for row, rs in runs.items()}
    base = med["tutorial"]
    print()
    print(f"{'row':<20} {'(a) ms/token':>13} {'(a) ratio':>10} {'(b) wall s':>11} {'(b) ratio':>10} {'peak RSS MB':>12}")
    for row in ROWS:
        m = med[row]
        print(f"{row:<20} {m['a_ms_per_token']:>13.1f} {m['a_ms_per_token'] / base['a_ms_per_token']:>9.3f}x "
              f"{m['b_wall_s']:>11.2f} {m['b_wall_s'] / base['b_wall_s']:>9.3f}x {m['peak_rss_mb']:>12.0f}")
    print(f"\n(a) one request, {NEW_TOKENS} new tokens; (b) {CONCURRENT} concurrent requests with different knobs, "
          f"{NEW_TOKENS} new tokens each; medians of {args.repeats} interleaved runs; torch threads: default "
          f"({os.cpu_count()} cores) except the 1thread row (model.threads = 1)")


if __name__ == "__main__":
    main()
