"""The CPU engine's own GPT-2 forward for serving: each row's keys in a slot of its own and a few tensor operations
per layer, so that a row's numbers are the same bit for bit alone or in any batch.

transformers' forward left-pads a batch to its longest row, builds masks, and goes through its cache and attention
layers; the width of the padded keys then changed a row's last bits with its batch mates (so attention ran once per
run of equal rows), and the Python around it cost more than the matrix products at one row. Here:

- every row owns one slot of each layer's key/value buffer, its keys at columns [0, length) and zeros after them;
  a step writes each row's new key and value in place (one indexed copy per layer);
- a step's attention is one batched matrix product per side and layer over the buffers' width (the longest row's,
  rounded up to WIDTH_STEP but never past the most keys any row can come to hold), the columns a row has not reached masked out with -inf: each (row, head) is its own
  product, whose bits do not depend on the batch, the width or the thread count (the -inf columns add exact zeros;
  tests/test_gpt2_decode.py checks this on the installed torch, alone vs in changing batches at 1 and 2 threads);
- a prefill runs the new prompts' tokens through the layers together (every linear layer, norm and GELU works row
  by row) and each prompt's causal attention on its own;
- rows that end are dropped by moving the last slots into their places.

It uses the model's own modules by their checkpoint names (transformer.wte/wpe/h[i].ln_1/attn.c_attn/…/lm_head), so
the int8 layers and whatever else replaces a module keep working; `decode_batch` says when a model is something else
(then the engine keeps transformers' forward).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from core.devices import device_of
from core.gpt2_model import GPT2LM
from core.int8_rows import RowInt8Linear

NEG_INF = float("-inf")
WIDTH_STEP = 16  # attention widths and buffer capacities are multiples of this


def supports(model: nn.Module) -> bool:
    """Whether `decode_batch` can serve `model`: a plain GPT-2 language model on the CPU (core.gpt2_model's, or
    transformers' when that is loaded: its modeling module is looked up, never imported, here)."""
    transformers_gpt2 = sys.modules.get("transformers.models.gpt2.modeling_gpt2")
    if type(model) is not GPT2LM and (transformers_gpt2 is None or type(model) is not transformers_gpt2.GPT2LMHeadModel):
        return False
    if device_of(model).type != "cpu":
        return False
    config = model.config
    return not (getattr(config, "add_cross_attention", False) or getattr(config, "reorder_and_upcast_attn", False))


def decode_batch(model: nn.Module, rows: int = 4) -> DecodeBatch | None:
    """A DecodeBatch over `model` with room for `rows` rows at first, or None where it does not apply."""
    return DecodeBatch(model, rows) if supports(model) else None


class _Layer:
    """One block's modules and its key/value buffers (slots × heads × width × head size)."""

    def __init__(self, block: nn.Module, index: int, config: object):
        self.ln_1, self.c_attn, self.proj = block.ln_1, block.attn.c_attn, block.attn.c_proj
        self.ln_2, self.c_fc, self.c_out = block.ln_2, block.mlp.c_fc, block.mlp.c_proj
        self.act = getattr(block.mlp.act, "forward", block.mlp.act)  # a module or a plain function
        scale = 1.0
        if config.scale_attn_weights:
            scale = (config.n_embd // config.n_head) ** -0.5
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(index + 1)
        self.scale = scale
        # Keys and values in one buffer (2 × slots × heads × width × head size), so that a step writes both with one
        # indexed copy; kv[0] (the keys) and kv[1] are each contiguous.
        self.kv = torch.zeros(2, 0, 0, 0, 0)
        # The int8 layers add their output to the residual stream in one pass fewer (RowInt8Linear.add_to).
        self.fused = isinstance(self.proj, RowInt8Linear) and isinstance(self.c_out, RowInt8Linear)


class DecodeBatch:
    """The running batch's state: what core.engine's `_Batch` keeps, with the same methods.

    `positions` holds each row's length (its next token's position), in the engine's row order; `_slot` maps that
    order to the buffers' slots."""

    def __init__(self, model: nn.Module, rows: int = 4):
        self.model = model
        self.first_slots = rows  # slots the first prefill reserves (the engine's batch size: no regrowing)
        config = model.config
        self.heads = int(config.n_head)
        self.head_size = int(config.n_embd) // self.heads
        self.limit = int(config.n_positions)
        self.wte, self.wpe, self.ln_f = model.transformer.wte, model.transformer.wpe, model.transformer.ln_f
        self.lm_head = model.lm_head
        self.layers = [_Layer(block, i, config) for i, block in enumerate(model.transformer.h)]
        self.mask = torch.zeros(0, 0)  # (slots, columns): 0 where a slot's row has a key, -inf elsewhere
        self.positions: list[int] = []
        self.reach: list[int] = []  # the most keys each row can come to hold (its prompt and every token it may be fed)
        self._slot: list[int] = []

    # ---- buffers ---------------------------------------------------------------------------------------------
    def _fit(self, rows: int, width: int) -> None:
        """Buffers with at least `rows` slots and exactly `width` columns, holding the rows already there.

        The width is the attention's: the matrix kernels read a buffer's rows (slot, head) at a stride, and a view of
        fewer columns than the buffer has made the two products per layer about twice as slow here, so the buffers
        are reallocated when the longest row crosses a multiple of WIDTH_STEP (or leaves) instead."""
        slots, capacity = self.mask.shape
        if rows <= slots and width == capacity:
            return
        slots = max(rows, 2 * slots, self.first_slots) if rows > slots else slots
        used, kept = len(self.positions), min(width, capacity)
        for layer in self.layers:
            # Slots past `used` are written whole when a prefill takes them: only the rows kept need zeros.
            kv = torch.empty(2, slots, self.heads, width, self.head_size)
            if used:
                kv[:, :used, :, :kept] = layer.kv[:, :used, :, :kept]
                kv[:, :used, :, kept:] = 0
            layer.kv = kv
        mask = torch.full((slots, width), NEG_INF)
        mask[:used, :kept] = self.mask[:used, :kept]
        self.mask = mask

    def _width(self, columns: int, reach: int) -> int:
        """The keys a step attends over: the longest row's, rounded up (fewer distinct shapes), but not past `reach`,
        the most keys any row can come to hold (a burst of rows that end at 49 tokens kept 64 columns, a quarter of its
        cache, for nothing). A row's result is the same whatever this width (the -inf columns add exact zeros;
        tests/test_gpt2_decode.py checks the kernels)."""
        if columns > self.limit:
            raise ValueError(f"a row of {columns} tokens exceeds the model's {self.limit} positions")
        return min(_round_up(columns, WIDTH_STEP), max(columns, reach), self.limit)

    # ---- the engine's interface ------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], copies: list[int], reach: list[int] | None = None) -> torch.Tensor:
        """Run new prompts and add each `copies` times as rows; returns their next-token logits (one per row).
        `reach`: per prompt, the most keys its rows can come to hold (the engine's max_length - 1: a row's last token
        is sampled, never fed back); by default the model's positions."""
        lengths = [len(p) for p in prompts]
        reach = [self.limit] * len(prompts) if reach is None else [max(r, n) for r, n in zip(reach, lengths)]
        # (a prompt longer than the model's positions fails here)
        width = self._width(max(lengths), max(self.reach + [r for r, c in zip(reach, copies) if c], default=0))
        # Prompts of one length side by side: each such group's attention is one batched product per side.
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        ids = torch.tensor([t for i in order for t in prompts[i]])
        positions = torch.cat([torch.arange(lengths[i]) for i in order])
        x = self.wte(ids) + self.wpe(positions)  # (all tokens, embedding): every op but attention is row by row
        groups: list[tuple[int, int, int]] = []  # (first token, prompts, length)
        starts: dict[int, int] = {}  # each prompt's first token
        start = 0
        for i in order:
            starts[i] = start
            if groups and groups[-1][2] == lengths[i]:
                groups[-1] = (groups[-1][0], groups[-1][1] + 1, lengths[i])
            else:
                groups.append((start, 1, lengths[i]))
            start += lengths[i]
        causal = {n: torch.full((n, n), NEG_INF).triu_(1) for _, _, n in groups}
        kept: list[torch.Tensor] = []
        for layer in self.layers:
            qkv = layer.c_attn.forward(layer.ln_1.forward(x)).view(len(ids), 3, self.heads, -1)
            parts = [self._causal_attention(layer, qkv[a:a + count * n].view(count, n, 3, self.heads, -1), causal[n])
                     for a, count, n in groups]
            x = self._finish(layer, x, torch.cat(parts))
            kept.append(qkv)
        spans = [(starts[i], starts[i] + lengths[i]) for i in range(len(prompts))]
        last = torch.tensor([b - 1 for _, b in spans])
        logits = self.lm_head.forward(self.ln_f.forward(x.index_select(0, last))).float()
        # Add the rows only now that nothing can fail: a failed prefill leaves the batch as it was.
        first, new = len(self.positions), sum(copies)
        self._fit(first + new, max(self.mask.shape[1], width))
        slots, width = self.mask.shape
        # Each new row's keys and values go in with one indexed copy per layer: a row (a copy of prompt i) takes the
        # prompt's token rows [a, b) at columns [0, b - a) of its slot, whose other columns are zeroed first.
        rows = [(first + r, a, b) for r, (a, b) in enumerate(s for s, n in zip(spans, copies) for _ in range(n))]
        token = torch.tensor([t for _, a, b in rows for t in range(a, b)], dtype=torch.long)
        column = torch.tensor([slot * self.heads * width + c for slot, a, b in rows for c in range(b - a)],
                              dtype=torch.long)
        side = torch.tensor([0, slots * self.heads * width])  # where the values' half begins
        where = column[:, None, None] + side[:, None] + torch.arange(self.heads) * width  # (tokens, 2, heads)
        for layer, qkv in zip(self.layers, kept):
            layer.kv[:, first:first + new] = 0  # whatever the slots held before
            layer.kv.view(-1, self.head_size).index_put_((where,), qkv.index_select(0, token)[:, 1:])
        seen = torch.arange(width) < torch.tensor([b - a for _, a, b in rows])[:, None]
        self.mask[first:first + new] = torch.zeros(new, width).masked_fill_(~seen, NEG_INF)
        self._slot.extend(range(first, first + new))
        self.positions.extend(n for n, c in zip(lengths, copies) for _ in range(c))
        self.reach.extend(r for r, c in zip(reach, copies) for _ in range(c))
        return logits.repeat_interleave(torch.tensor(copies), 0)

    @torch.inference_mode()
    def step(self, last_tokens: list[int]) -> torch.Tensor:
        """Feed each row its last token; returns next-token logits, one row each (float32, CPU)."""
        rows, heads, size = len(last_tokens), self.heads, self.head_size
        width = self._width(max(self.positions) + 1, max(self.reach))
        self._fit(rows, width)
        slots = self.mask.shape[0]
        # The batch runs in slot order; the engine's order is restored before the lm_head.
        order = self._slot
        by_slot, pos = [0] * rows, [0] * rows
        for i, s in enumerate(order):
            by_slot[s], pos[s] = last_tokens[i], self.positions[i]
        position = torch.tensor(pos)
        x = self.wte(torch.tensor(by_slot)).add_(self.wpe(position))
        self.mask.view(-1).index_fill_(0, torch.arange(0, rows * width, width).add_(position), 0.0)  # the new keys
        mask = self.mask[:rows, None, None].expand(rows, heads, 1, width).reshape(-1, 1, width)
        # Where each row's new key and value go in a layer's buffer seen as (2 * slots * heads * width, head size)
        # rows: (rows, 2, heads), matching c_attn's output (rows, q/k/v, heads, head size) past its queries.
        column = torch.arange(0, rows * heads * width, heads * width).add_(position)
        where = (column[:, None, None] + torch.tensor([0, slots * heads * width])[:, None]
                 + torch.arange(0, heads * width, width))
        for layer in self.layers:
            qkv = layer.c_attn.forward(layer.ln_1.forward(x)).view(rows, 3, heads, size)
            layer.kv.view(-1, size).index_put_((where,), qkv[:, 1:])
            x = self._finish(layer, x, self.attend(layer, qkv[:, 0], mask, rows).view(rows, -1))
        if order != list(range(rows)):
            x = x.index_select(0, torch.tensor(order))
        self.positions = [p + 1 for p in self.positions]
        return self.lm_head.forward(self.ln_f.forward(x)).float()

    @torch.inference_mode()
    def select(self, keep: list[int]) -> None:
        """Keep the rows at `keep` (in that order): the last slots move into the places of the rows dropped."""
        if not keep:
            self.__init__(self.model, self.first_slots)  # an idle engine holds no cache
            return
        kept_slots = [self._slot[i] for i in keep]
        rows = len(keep)
        moved = dict(zip(sorted(s for s in kept_slots if s >= rows), sorted(set(range(rows)) - set(kept_slots))))
        if moved:
            src, dst = torch.tensor(list(moved)), torch.tensor(list(moved.values()))
            for layer in self.layers:
                layer.kv[:, dst] = layer.kv[:, src]
            self.mask[dst] = self.mask[src]
        self._slot = [moved.get(s, s) for s in kept_slots]
        self.positions = [self.positions[i] for i in keep]
        self.reach = [self.reach[i] for i in keep]
        self._fit(rows, self._width(max(self.positions) + 1, max(self.reach)))  # the rows left: narrower buffers

    def snapshot(self) -> tuple:
        """What `restore` needs to undo a failed step: a step only writes the column at each row's position."""
        return list(self.positions), list(self._slot)

    @torch.inference_mode()
    def restore(self, saved: tuple) -> None:
        self.positions, self._slot = list(saved[0]), list(saved[1])
        for length, slot in zip(self.positions, self._slot):
            self.mask[slot] = NEG_INF
            self.mask[slot, :length] = 0

    @torch.inference_mode()
    def copy(self) -> DecodeBatch:
        other = DecodeBatch(self.model, self.first_slots)
        rows = len(self.positions)
        other._fit(rows, self.mask.shape[1])
        for mine, theirs in zip(self.layers, other.layers):
            theirs.kv[:, :rows] = mine.kv[:, :rows]
        other.mask[:rows] = self.mask[:rows]
        other.positions, other._slot, other.reach = list(self.positions), list(self._slot), list(self.reach)
        return other

    # ---- one block -------------------------------------------------------------------------------------------
    def attend(self, layer: _Layer, q: torch.Tensor, mask: torch.Tensor, rows: int) -> torch.Tensor:
        """Each row's query over its keys: one batched product per side over every column (rows × heads)."""
        size, width = self.head_size, self.mask.shape[1]
        keys, values = layer.kv[:, :rows].view(2, -1, width, size).unbind()  # the first slots: each contiguous
        scores = torch.baddbmm(mask, q.reshape(-1, 1, size), keys.transpose(1, 2), alpha=layer.scale)
        return torch.bmm(scores.softmax(dim=-1), values)

    def _causal_attention(self, layer: _Layer, qkv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Prompts of one length (qkv: prompts × tokens × 3 × heads × head size), each token over itself and the
        tokens before it in its own prompt; returns (prompts × tokens, embedding)."""
        count, n, _, heads, size = qkv.shape
        q, k, v = (qkv[:, :, i].transpose(1, 2).reshape(count * heads, n, size) for i in range(3))
        scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=layer.scale)
        out = torch.bmm(scores.softmax(dim=-1), v)
        return out.view(count, heads, n, size).transpose(1, 2).reshape(count * n, heads * size)

    @staticmethod
    def _finish(layer: _Layer, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The attention's projection and the MLP, with GPT-2's residual connections. (Modules are called through
        `forward`: nothing hooks them, and the call machinery cost as much as a small operation.)"""
        if layer.fused:
            x = layer.proj.add_to(x, attended)
            return layer.c_out.add_to(x, layer.act(layer.c_fc.forward(layer.ln_2.forward(x))))
        x = x + layer.proj.forward(attended)
        return x + layer.c_out.forward(layer.act(layer.c_fc.forward(layer.ln_2.forward(x))))


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step
