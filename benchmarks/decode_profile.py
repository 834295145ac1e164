"""Where a decode step's time goes, on this machine: matrix products, attention, the rest of the model, sampling, and
the Python around them. Side by side, steps interleaved, medians reported:

- `dynamic`: torch's dynamic int8 through transformers' forward (one activation scale per batch: seeds move with the
  batch; the speed the engine had before seeds held in any batch, for reference);
- `hf`: per-row int8 layers through transformers' forward with per-row attention runs (the engine before its own
  decode path; still the path for models and devices that path does not serve);
- `own`: the engine's own GPT-2 decode path (core/gpt2_decode.py), the serving default on a CPU.

    python benchmarks/decode_profile.py               # 16 rows, ~1-2 minutes on 2 cores
    python benchmarks/decode_profile.py --rows 1

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
import statistics
import sys
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
    counted apart, so the attention itself is the block minus them)."""
    linear_types = (RowInt8Linear, torch.ao.nn.quantized.dynamic.Linear)
    for name, module in model.named_modules():
        if name == "lm_head":
            module.forward = clock.wrap(("lm_head",), module.forward)
        elif isinstance(module, linear_types):
            parts = ("linear", "attention's linear") if ".attn." in name else ("linear",)
            module.forward = clock.wrap(parts, module.forward)
        elif type(module).__name__ == "GPT2Attention":
            module.forward = clock.wrap(("attention block",), module.forward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=51200, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    fp32 = fuse_gelu(GPT2LMHeadModel(config).eval())
    dynamic = torch.ao.quantization.quantize_dynamic(dynamic_int8(copy.deepcopy(fp32)), {torch.nn.Linear},
                                                     dtype=torch.qint8)
    int8 = quantize_int8(rowwise_attention(fp32))
    clock = Clock(time.process_time if args.clock == "cpu" else time.perf_counter)  # one clock: the paths run one after another, and `hf` and `own` share the int8 model
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
    batches = {"dynamic": _Batch(dynamic), "hf": _Batch(int8), "own": DecodeBatch(int8)}
    batches["own"].attend = clock.wrap(("attention",), batches["own"].attend)
    for batch in batches.values():
        batch.prefill(prompts, [1] * len(prompts))
    tokens = {name: [list(p) for p in prompts] for name in batches}
    histories = {name: [History(p, k.no_repeat_ngram_size) for p, k in zip(prompts, knobs)] for name in batches}
    per_step: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in batches}
    generators = {name: [torch.Generator().manual_seed(i) for i in range(args.rows)] for name in batches}
    for step in range(args.steps + 3):
        for name, batch in batches.items():  # interleaved: every path sees the same neighbours' load
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
    print(f"{args.rows} rows, KoGPT2-base shape, {args.clock} ms per decode step (median of {args.steps} interleaved "
          f"steps), {torch.get_num_threads()} threads, prompts of {lengths[0]}-{lengths[-1]} tokens + {args.steps + 3} steps")
    print(f"{'part':<52} {'dynamic':>8} {'hf':>8} {'own':>8} {'own/hf':>7}")
    for part in PARTS:
        dyn, hf, own = (statistics.median(per_step[n][part]) * 1000 for n in ("dynamic", "hf", "own"))
        print(f"{part:<52} {dyn:>8.2f} {hf:>8.2f} {own:>8.2f} {own / hf if hf else float('nan'):>6.2f}x")


if __name__ == "__main__":
    main()
