"""What best_of costs: one /gen's latency through the engine for best_of = 1, 2, 4, 8, fp32 and int8, side by side.

    python benchmarks/best_of_latency.py [--model models/nsmc-small] [--repeats 15]

Each request is a labelled prompt with the chat defaults from settings.toml (best_of overridden per row); one
engine per quantization, requests one at a time, rows interleaved, medians reported with the ratio to the first row.
The model is whatever settings serve (the embedded model by default).
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

    engines = {}
    for quantize in args.quantize:
        model = {"quantize": quantize, **({"pretrained": args.model} if args.model else {})}
        settings = load_settings(model=model)
        engines[quantize] = await start_engine(settings)
    base = default_knobs(settings.generation)
    rows = [(q, k) for q in args.quantize for k in args.best_of]
    times: dict[tuple, list[float]] = {row: [] for row in rows}
    tokens: dict[tuple, list[int]] = {row: [] for row in rows}
    try:
        for i in range(args.repeats):
            for quantize, k in rows:
                engine = engines[quantize]
                label, prompt = PROMPTS[i % len(PROMPTS)].split(" ", 1)
                request = GenRequest(label, prompt, replace(base, best_of=k, seed=i))
                started = time.perf_counter()
                result = await engine.generate(engine.prepare(request))
                times[quantize, k].append(time.perf_counter() - started)
                tokens[quantize, k].append(result.new_tokens)
    finally:
        for engine in engines.values():
            await engine.stop()
    print(f"model: {settings.model.pretrained}; knobs: {base.as_dict()}; {args.repeats} requests per row, interleaved")
    print("| quantize | best_of | median ms / request | p90 ms | tokens sampled (mean) | ratio to the first row |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    ref = statistics.median(times[rows[0]])
    for row in rows:
        med = statistics.median(times[row])
        p90 = sorted(times[row])[int(0.9 * (len(times[row]) - 1))]
        print(f"| {row[0]} | {row[1]} | {med * 1000:.0f} | {p90 * 1000:.0f} | {statistics.mean(tokens[row]):.0f} | "
              f"{med / ref:.2f}× |")


def main() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="default: settings.toml's model.pretrained")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--best-of", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--quantize", type=lambda s: s.split(","), default=["none", "int8"])
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
