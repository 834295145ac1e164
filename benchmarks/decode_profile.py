"""Where a decode step's time goes, on this machine: matrix products, attention, the rest of the model, sampling, and
the Python around them. Side by side: the serving path (per-row int8 layers, per-row attention) and the previous one
(torch's dynamic int8, one SDPA call over the padded batch), steps interleaved, medians reported.

    python benchmarks/decode_profile.py            # ~1 minute on 2 cores

Model: GPT-2 with KoGPT2-base's shape, random weights. Batch: 16 rows of mixed prompt lengths (4 lengths, as a
burst of chats brings) and 16 knob sets, or `--rows 1`. Each part is timed with wall clocks around the module calls
(torch.profiler's per-operator times drift on a shared 2-core box), so the parts add up to the step.
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
from core.knobs import Knobs
from core.sampling import next_tokens
from core.speedups import RowInt8Linear, fuse_gelu, quantize_int8, rowwise_attention


def previous_int8(model: torch.nn.Module) -> torch.nn.Module:
    """The path before per-row int8: Conv1D as nn.Linear, then torch's dynamic quantization."""
    for name, child in list(model.named_children()):
        if isinstance(child, Conv1D):
            linear = torch.nn.Linear(*child.weight.shape)
            linear.weight.data, linear.bias.data = child.weight.t().contiguous(), child.bias.data
            setattr(model, name, linear)
        else:
            previous_int8(child)
    return model


class Clock:
    """Wall time per part, summed over a step; a call may count towards several parts (they nest)."""

    def __init__(self):
        self.spent: dict[str, float] = defaultdict(float)

    def wrap(self, parts: tuple[str, ...], fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                for part in parts:
                    self.spent[part] += time.perf_counter() - started
        return timed


def instrument(model: torch.nn.Module, clock: Clock) -> None:
    """Time every linear layer, the lm_head and each attention block (whose own linear layers are also counted apart,
    so the attention itself is the block minus them)."""
    linear_types = (RowInt8Linear, torch.ao.nn.quantized.dynamic.Linear)
    for name, module in model.named_modules():
        if name == "lm_head":
            module.forward = clock.wrap(("lm_head",), module.forward)
        elif isinstance(module, linear_types):
            parts = ("linear layers", "attention's linear layers") if ".attn." in name else ("linear layers",)
            module.forward = clock.wrap(parts, module.forward)
        elif type(module).__name__ == "GPT2Attention":
            module.forward = clock.wrap(("attention block",), module.forward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=51200, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    fp32 = fuse_gelu(GPT2LMHeadModel(config).eval())
    old = torch.ao.quantization.quantize_dynamic(previous_int8(copy.deepcopy(fp32)), {torch.nn.Linear}, dtype=torch.qint8)
    new = quantize_int8(rowwise_attention(fp32))
    clocks = {"previous": Clock(), "now": Clock()}
    models = {"previous": old, "now": new}
    for name, model in models.items():
        instrument(model, clocks[name])
    gen = torch.Generator().manual_seed(1)
    lengths = sorted(30 + 3 * (i % 4) for i in range(args.rows))
    prompts = [torch.randint(5, 8000, (n,), generator=gen).tolist() for n in lengths]
    knobs = [Knobs(min_length=1, max_length=1000, top_p=[1.0, 0.95, 0.9, 0.8][i % 4], top_k=[1, 5, 20, 50][i % 4],
                   repetition_penalty=[1.0, 1.2][i % 2], no_repeat_ngram_size=0, temperature=1.0, seed=i)
             for i in range(args.rows)]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    batches = {}
    for name, model in models.items():
        batches[name] = _Batch(model)
        batches[name].prefill(prompts, [1] * len(prompts))
    tokens = {name: [list(p) for p in prompts] for name in models}
    per_step: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in models}
    generators = {name: [torch.Generator().manual_seed(i) for i in range(args.rows)] for name in models}
    for step in range(args.steps + 3):
        for name in models:  # interleaved: both see the same neighbours' load
            clock, batch = clocks[name], batches[name]
            clock.spent.clear()
            started = time.perf_counter()
            logits = clock.wrap(("model forward",), batch.step)([t[-1] for t in tokens[name]])
            width = max(map(len, tokens[name]))
            ids = torch.tensor([[-1] * (width - len(t)) + t for t in tokens[name]])
            drawn = clock.wrap(("sampling",), next_tokens)(ids, logits, knobs, generators[name], 0)
            for t, token in zip(tokens[name], drawn):
                t.append(token)
            total = time.perf_counter() - started
            if step >= 3:
                spent = dict(clock.spent)
                forward = spent.pop("model forward")
                attention = spent.get("attention block", 0.0) - spent.get("attention's linear layers", 0.0)
                parts = {"linear layers (int8 products, quantizing rows)": spent.get("linear layers", 0.0),
                         "lm_head (768 x 51,200)": spent.get("lm_head", 0.0), "attention": attention}
                parts["rest of the model (norms, GELU, embeddings, cache)"] = forward - sum(parts.values())
                parts["sampling"] = spent.get("sampling", 0.0)
                parts["Python around them"] = total - forward - parts["sampling"]
                parts["step"] = total
                for part, value in parts.items():
                    per_step[name][part].append(value)
    print(f"{args.rows} rows, KoGPT2-base shape, ms per decode step (median of {args.steps} interleaved steps), "
          f"{torch.get_num_threads()} threads")
    print(f"{'part':<52} {'previous':>9} {'now':>9} {'now/prev':>9}")
    for part in per_step["now"]:
        prev, now = (statistics.median(per_step[n][part]) * 1000 for n in ("previous", "now"))
        print(f"{part:<52} {prev:>9.2f} {now:>9.2f} {now / prev if prev else float('nan'):>8.2f}x")


if __name__ == "__main__":
    main()
