"""The engine's per-step work outside the model, before and after, side by side: `Engine._advance` (the sampling
rules, the draws and the bookkeeping around them: own log-probabilities for best_of, the engine node's logprobs,
recording each token) on the same logits, steps interleaved, medians reported. "before" is the engine and sampling
code of a git revision (`--before`, the release before the sampling rework by default), loaded from git beside the
working tree's; both run with this tree's other modules. Each workload also checks that both draw the same tokens.

    python benchmarks/sampling_speed.py                 # ~1 minute on 2 cores
    python benchmarks/sampling_speed.py --threads 1

Workloads: benchmarks/engine_speed.py's 16 knob sets (16 rows, and its first set and the default knobs alone), the
chat's best_of 4, n = 3, a logprobs request, and 4 rows of 900-token prompts with every penalty on (near
max_length). The logits are random (KoGPT2-base's 51,200 tokens); no model runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from core import engine as after_engine
from core.knobs import Knobs
from core.types import GenRequest

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 51200
BEFORE = "0592465"  # the last commit before the sampling rework


def module_at(revision: str, path: str, name: str, replace: dict[str, types.ModuleType]) -> types.ModuleType:
    """`path` as it was at `revision`, imported as `name`, with `replace` standing in for modules it imports."""
    source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    sys.modules[name] = module  # dataclasses look their module up
    saved = {key: sys.modules.get(key) for key in replace}
    sys.modules.update(replace)
    try:
        exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    return module


def knobs(**changes: object) -> Knobs:
    base = dict(min_length=10, max_length=1000, top_p=1.0, top_k=50, repetition_penalty=1.0, no_repeat_ngram_size=0,
                temperature=1.0, seed=None, n=1, best_of=1)
    return Knobs(**{**base, **changes})


def workloads() -> dict[str, list[tuple[GenRequest, int]]]:
    """Each workload's requests and prompt lengths."""
    from engine_speed import knob_sets

    sets = [knobs(**{k: s[k] for k in ("top_k", "top_p", "temperature", "repetition_penalty", "no_repeat_ngram_size",
                                        "seed")}) for s in knob_sets()]
    return {
        "16 knob sets, 16 rows": [(GenRequest(None, "x", k), 8 + 3 * (i % 4)) for i, k in enumerate(sets)],
        "knob set 0 (greedy), 1 row": [(GenRequest(None, "x", sets[0]), 8)],
        "default knobs, 1 row": [(GenRequest(None, "x", knobs(seed=1)), 8)],
        "best_of 4, 4 rows": [(GenRequest("긍정", "x", knobs(seed=2, best_of=4)), 8)],
        "n 3 x best_of 2, 6 rows": [(GenRequest("긍정", "x", knobs(seed=3, n=3, best_of=2)), 8)],
        "logprobs 5, 1 row": [(GenRequest(None, "x", knobs(seed=4), logprobs=5), 8)],
        "900-token prompts, all penalties, 4 rows": [
            (GenRequest(None, "x", knobs(seed=5 + i, top_p=0.9, repetition_penalty=1.2, no_repeat_ngram_size=3,
                                         min_length=950, temperature=0.8)), 900 + 10 * i) for i in range(4)],
    }


def engine_of(module: types.ModuleType) -> object:
    """An engine object of `module` with just what `_start` and `_advance` read; answers go nowhere."""
    engine = module.Engine.__new__(module.Engine)
    engine.eos_id = 0
    engine._publish = lambda job, done: None  # noqa: SLF001 (the private step is what is timed)
    return engine


def run(workload: list[tuple[GenRequest, int]], steps: int, before: types.ModuleType) -> tuple[list[float], ...]:
    gen = torch.Generator().manual_seed(0)
    rows_count = sum(request.rows for request, _ in workload)
    logits = [torch.randn(rows_count, VOCAB, generator=gen) * 3 for _ in range(8)]
    prompts = [torch.randint(5, 8000, (length,), generator=gen).tolist() for _, length in workload]
    sides = []
    for module in (before, after_engine):
        engine = engine_of(module)
        jobs = []
        for (request, _), prompt in zip(workload, prompts):
            seeds = [request.knobs.seed * 10 + i for i in range(request.rows)]
            jobs.append(module._Job(request, prompt, seeds, None, None, None))  # noqa: SLF001
        sides.append((engine, engine._start(jobs, logits[0])))  # noqa: SLF001
    times: tuple[list[float], list[float]] = ([], [])
    fresh = torch.empty_like(logits[0])
    for step in range(steps):
        for side, (engine, rows) in enumerate(sides):
            fresh.copy_(logits[step % len(logits)])  # just written, as the lm_head's output is
            started = time.perf_counter()
            engine._advance(rows, fresh)  # noqa: SLF001
            times[side].append(time.perf_counter() - started)
    (_, old), (_, new) = sides
    assert [row.tokens for row in old] == [row.tokens for row in new], "the two versions drew different tokens"
    assert [row.job.own_logprobs for row in old] == [row.job.own_logprobs for row in new]
    assert [row.job.token_logprobs for row in old] == [row.job.token_logprobs for row in new]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--before", default=BEFORE, help="the git revision to compare with")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old_sampling = module_at(args.before, "core/sampling.py", "before_sampling", {})
    before = module_at(args.before, "core/engine.py", "before_engine", {"core.sampling": old_sampling})
    print(f"ms per step of Engine._advance (median of {args.steps} interleaved steps), {torch.get_num_threads()} "
          f"threads, before = {args.before}; same tokens, own and token log-probabilities in every workload")
    print(f"{'workload':<44} {'before':>8} {'after':>8} {'after/before':>13}")
    for name, workload in workloads().items():
        old, new = (statistics.median(t) * 1000 for t in run(workload, args.steps, before))
        print(f"{name:<44} {old:>8.3f} {new:>8.3f} {new / old:>12.2f}x")


if __name__ == "__main__":
    main()
