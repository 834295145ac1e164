"""Where a decode step's time goes, on this machine: matrix products, attention, the rest of the model, sampling, and
the Python around them. Side by side, steps interleaved, medians reported:

- `dynamic`: torch's dynamic int8 through transformers' forward (one activation scale per batch: seeds move with the
  batch; the speed the engine had before seeds held in any batch, for reference);
- `hf`: per-row int8 layers through transformers' forward with per-row attention runs (the engine before its own
  decode path; still the path for models and devices that path does not serve);
- `own`: the engine's own GPT-2 decode path (core/gpt2_decode.py), the serving default on a CPU;
- `before` (with `--baseline REV`): the same path as git revision REV had it (its core/gpt2_decode.py and
  RowInt8Linear.forward, over the same model), to measure a change side by side.

    python benchmarks/decode_profile.py               # 16 rows, ~1-2 minutes on 2 cores
    python benchmarks/decode_profile.py --rows 1
    python benchmarks/decode_profile.py --rows 1 --paths before,own --baseline HEAD~3

`--plain` times the forward without the per-part clocks (their own cost is then out of the comparison).
A line after the step's parts gives the prefill of the batch's prompts (medians of `--prefills` interleaved runs),
and one the tensor operations a step dispatches (top-level operators under torch.profiler, the forward and sampling:
a count, so the same on a busy box).

Model: GPT-2 with KoGPT2-base's shape, random weights. Batch: `--rows` rows of mixed prompt lengths (4 lengths, as a
burst of chats brings) and as many knob sets (benchmarks/engine_speed.py's). Each part is timed with wall clocks
around its calls (torch.profiler's per-operator times drift on a shared 2-core box), so the parts add up to the
step. `--threads` fixes the thread count (the engine's tuner picks 1 or 2 per batch size while serving). On a box
other work shares, `--threads 1 --clock cpu` counts this process's CPU time instead of wall time: steadier, and
the same thing when one thread does all the work.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from core.engine import _Batch
from core.gpt2_decode import DecodeBatch
from core.int8_rows import RowInt8Linear
from core.knobs import Knobs
from core.sampling import History, next_tokens
from core.speedups import fuse_gelu, quantize_int8, rowwise_attention

PARTS = ("linear layers (48 int8 products, row scales)", "lm_head (768 x 51,200)", "attention",
         "rest of the model (norms, GELU, embeddings, cache)", "sampling (per-row rules, draws)",
         "Python around them (engine bookkeeping)", "step")
ROOT = Path(__file__).resolve().parents[1]


def dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Conv1D as nn.Linear, then torch's dynamic quantization (one activation scale per batch)."""
    for name, child in list(model.named_children()):
        if isinstance(child, Conv1D):
            linear = torch.nn.Linear(*child.weight.shape)
            linear.weight.data, linear.bias.data = child.weight.t().contiguous(), child.bias.data
            setattr(model, name, linear)
        else:
            dynamic_int8(child)
    return model


class Clock:
    """Time per part, summed over a step; a call may count towards several parts (they nest)."""

    def __init__(self, now=time.perf_counter):
        self.spent: dict[str, float] = defaultdict(float)
        self.now = now

    def wrap(self, parts: tuple[str, ...], fn):
        def timed(*args, **kwargs):
            started = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                for part in parts:
                    self.spent[part] += self.now() - started
        return timed


def instrument(model: torch.nn.Module, clock: Clock) -> None:
    """Time every linear layer, the lm_head and each transformers attention block (whose own linear layers are also
    counted apart, so the attention itself is the block minus them). The wrappers call the class's methods at each
    call, so that `--baseline` can swap in another RowInt8Linear.forward."""
    linear_types = (RowInt8Linear, torch.ao.nn.quantized.dynamic.Linear)
    for name, module in model.named_modules():
        if name == "lm_head":
            parts = ("lm_head",)
        elif isinstance(module, linear_types):
            parts = ("linear", "attention's linear") if ".attn." in name else ("linear",)
        elif type(module).__name__ == "GPT2Attention":
            parts = ("attention block",)
        else:
            continue
        for method in ("forward", "add_to"):
            if hasattr(type(module), method):
                setattr(module, method, clock.wrap(parts, _late(module, method)))


def _late(module: torch.nn.Module, method: str):
    return lambda *args, **kwargs: getattr(type(module), method)(module, *args, **kwargs)


def baseline(rev: str) -> tuple[type, object]:
    """(DecodeBatch, RowInt8Linear.forward) as git revision `rev` of this repository had them."""
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("int8_rows", "gpt2_decode"):
            path = Path(tmp) / f"{name}.py"
            path.write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:core/{name}.py"], check=True,
                                           capture_output=True, text=True).stdout)
            spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            found.append(module)
    rows, decode = found
    return decode.DecodeBatch, getattr(rows, "RowInt8Linear", None) and rows.RowInt8Linear.forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--paths", default="dynamic,hf,own", help="comma-separated: dynamic, hf, own, before")
    parser.add_argument("--baseline", default="HEAD", help="the git revision the `before` path comes from")
    parser.add_argument("--prefills", type=int, default=5)
    parser.add_argument("--plain", action="store_true", help="no per-part clocks inside the forward")
    args = parser.parse_args()
    paths = args.paths.split(",")
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=51200, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    fp32 = fuse_gelu(GPT2LMHeadModel(config).eval())
    dynamic = torch.ao.quantization.quantize_dynamic(dynamic_int8(copy.deepcopy(fp32)), {torch.nn.Linear},
                                                     dtype=torch.qint8)
    int8 = quantize_int8(rowwise_attention(fp32))
    clock = Clock(time.process_time if args.clock == "cpu" else time.perf_counter)  # one clock: the paths run one after another, and `hf` and `own` share the int8 model
    if not args.plain:
        instrument(int8, clock)
        instrument(dynamic, clock)
    gen = torch.Generator().manual_seed(1)
    lengths = sorted(8 + 3 * (i % 4) for i in range(args.rows))
    prompts = [torch.randint(5, 8000, (n,), generator=gen).tolist() for n in lengths]
    from engine_speed import knob_sets  # the benchmark's 16 knob sets, cycled

    sets = knob_sets()
    knobs = [Knobs(min_length=1, max_length=1000, **{k: sets[i % len(sets)][k] for k in (
        "top_k", "top_p", "temperature", "repetition_penalty", "no_repeat_ngram_size", "seed")})
        for i in range(args.rows)]
    torch.set_num_threads(args.threads)
    new_forward = RowInt8Linear.forward
    old_batch, old_forward = baseline(args.baseline) if "before" in paths else (None, None)
    makers = {"dynamic": lambda: _Batch(dynamic), "hf": lambda: _Batch(int8), "own": lambda: DecodeBatch(int8),
              "before": lambda: old_batch(int8)}

    def forward_of(name: str) -> None:
        RowInt8Linear.forward = old_forward if name == "before" else new_forward

    prefill_s: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.prefills):
        for name in paths:
            forward_of(name)
            batch = makers[name]()
            started = clock.now()
            batch.prefill(prompts, [1] * len(prompts))
            prefill_s[name].append(clock.now() - started)
    batches = {name: makers[name]() for name in paths}
    for name in ("own", "before"):
        if name in batches and not args.plain:
            batches[name].attend = clock.wrap(("attention",), batches[name].attend)
    for name, batch in batches.items():
        forward_of(name)
        batch.prefill(prompts, [1] * len(prompts))
    tokens = {name: [list(p) for p in prompts] for name in batches}
    histories = {name: [History(p, k.no_repeat_ngram_size) for p, k in zip(prompts, knobs)] for name in batches}
    per_step: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in batches}
    generators = {name: [torch.Generator().manual_seed(i) for i in range(args.rows)] for name in batches}
    for step in range(args.steps + 3):
        for name, batch in batches.items():  # interleaved: every path sees the same neighbours' load
            forward_of(name)
            clock.spent.clear()
            started = clock.now()
            logits = clock.wrap(("forward",), batch.step)([t[-1] for t in tokens[name]])
            drawn = clock.wrap(("sampling",), next_tokens)(histories[name], logits, knobs, generators[name], 0)
            for t, history, token in zip(tokens[name], histories[name], drawn):
                t.append(token)
                history.append(token)
            total = clock.now() - started
            if step < 3:
                continue
            spent = dict(clock.spent)
            attention = spent.get("attention", 0.0) or spent.get("attention block", 0.0) - spent.get(
                "attention's linear", 0.0)
            values = [spent.get("linear", 0.0), spent.get("lm_head", 0.0), attention]
            values.append(spent["forward"] - sum(values))
            values += [spent["sampling"], total - spent["forward"] - spent["sampling"], total]
            for part, value in zip(PARTS, values):
                per_step[name][part].append(value)
    for name, batch in batches.items():
        forward_of(name)
        fresh = [History(t, k.no_repeat_ngram_size) for t, k in zip(tokens[name], knobs)]
        with torch.profiler.profile() as profiler:
            logits = batch.step([t[-1] for t in tokens[name]])
            next_tokens(fresh, logits, knobs, [torch.Generator().manual_seed(0)] * args.rows, 0)
        per_step[name]["operations"] = [sum(e.cpu_parent is None for e in profiler.events()) / 1000]
    print(f"{args.rows} rows, KoGPT2-base shape, {args.clock} ms per decode step (median of {args.steps} interleaved "
          f"steps), {torch.get_num_threads()} threads, prompts of {lengths[0]}-{lengths[-1]} tokens + {args.steps + 3} steps")
    reference = "before" if "before" in paths else "hf"
    ratio = f"own/{reference}" if "own" in paths and reference in paths and reference != "own" else None
    print(f"{'part':<52}" + "".join(f" {n:>8}" for n in paths) + (f" {ratio:>10}" if ratio else ""))
    rows = [(part, [statistics.median(per_step[n][part]) * 1000 for n in paths]) for part in PARTS]
    if args.plain:  # the forward is one part
        rows = [("forward (--plain: not split)", values) if part == PARTS[3] else (part, values)
                for part, values in rows if part not in PARTS[:3]]
    rows.append((f"prefill ({args.rows} prompts, median of {args.prefills})",
                 [statistics.median(prefill_s[n]) * 1000 for n in paths]))
    rows.append(("tensor operations per step (a count, not ms)", [per_step[n]["operations"][0] * 1000 for n in paths]))
    for part, values in rows:
        line = f"{part:<52}" + "".join(f" {v:>8.2f}" for v in values)
        if ratio:
            own, ref = values[paths.index("own")], values[paths.index(reference)]
            line += f" {own / ref if ref else float('nan'):>9.2f}x"
        print(line)


if __name__ == "__main__":
    main()
