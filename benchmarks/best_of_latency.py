"""What best_of costs: one /gen's latency through the engine for best_of = 1, 2, 4, 8, side by side in one run.

    python benchmarks/best_of_latency.py [--model models/nsmc-small] [--repeats 15]

Each request is a labelled prompt with the chat defaults from settings.toml (best_of overridden per row); rows are
interleaved, one request at a time, and medians reported with the ratio to best_of = 1. The model is whatever
settings serve (the embedded model by default), with the settings' quantization.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ("긍정 아 정말", "부정 이 영화는", "긍정 배우들의 연기가", "부정 스토리가", "긍정 솔직히", "부정 오랜만에 본")


async def run(args: argparse.Namespace) -> None:
    from core.engine import start_engine
    from core.knobs import default_knobs
    from core.settings import load_settings
    from core.types import GenRequest

    overrides = {"model": {"pretrained": args.model}} if args.model else {}
    settings = load_settings(**overrides)
    engine = await start_engine(settings)
    base = default_knobs(settings.generation)
    times: dict[int, list[float]] = {k: [] for k in args.best_of}
    tokens: dict[int, list[int]] = {k: [] for k in args.best_of}
    try:
        for i in range(args.repeats):
            for k in args.best_of:
                label, prompt = PROMPTS[i % len(PROMPTS)].split(" ", 1)
                request = GenRequest(label, prompt, replace(base, best_of=k, seed=i))
                started = time.perf_counter()
                result = await engine.generate(engine.prepare(request))
                times[k].append(time.perf_counter() - started)
                tokens[k].append(result.new_tokens)
    finally:
        await engine.stop()
    print(f"model: {engine.source}; knobs: {base.as_dict()}; {args.repeats} requests per row, interleaved")
    print("| best_of | median ms / request | p90 ms | tokens sampled (mean) | ratio to best_of=1 |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    ref = statistics.median(times[args.best_of[0]])
    for k in args.best_of:
        med = statistics.median(times[k])
        p90 = sorted(times[k])[int(0.9 * (len(times[k]) - 1))]
        print(f"| {k} | {med * 1000:.0f} | {p90 * 1000:.0f} | {statistics.mean(tokens[k]):.0f} | {med / ref:.2f}× |")


def main() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="default: settings.toml's model.pretrained")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--best-of", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
