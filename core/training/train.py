"""Fine-tune (or train from scratch) a sentiment-conditioned GPT-2 on NSMC-format reviews.

    python -m core.train --from-scratch --max-minutes 50 --out runs/nsmc-small
    python -m core.train --pretrained skt/kogpt2-base-v2 --epochs 1 --out runs/kogpt2-nsmc   # with the hub or a local copy

Data: `--data-dir DIR` (ratings_train.txt, ratings_test.txt) or, without it, NSMC downloaded once into a cache.

Each example is `"긍정 " + review + "</s>"` (or `"부정 "`), as in the tutorial, plus the end-of-text token so the
model learns where a review ends.

Serve the result, unchanged (the output directory is a Hugging Face model directory with its tokenizer):

    BOT_MODEL__PRETRAINED=<out> python -m bot
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from core.errors import ModelLoadError, UserError
from core.hub import TRAINING, load_named
from core.training.data import nsmc_files, read_nsmc
from core.training.tokenizer import load_pretrained_tokenizer, train_tokenizer
from core.types import NEGATIVE, POSITIVE

STATE_FILE = "train_state.pt"


def example_text(document: str, label: int) -> str:
    return f"{POSITIVE if label else NEGATIVE} {document}"


@dataclass
class TrainArgs:
    data_dir: str
    train: str
    valid: str
    out: str
    from_scratch: bool
    pretrained: str
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    max_tokens: int
    batch_size: int
    lr: float
    warmup_steps: int
    epochs: float
    max_steps: int
    max_minutes: float
    eval_every: int
    valid_size: int
    seed: int
    threads: int
    lightning_ckpt: bool
    save_dtype: str
    limit: int


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    p = argparse.ArgumentParser(prog="python -m core.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="", help="a local NSMC copy (ratings_train.txt, ratings_test.txt); "
                   "default: download NSMC once into ~/.cache/kogpt2-sentiment-bot/nsmc")
    p.add_argument("--train", default="", help="NSMC-format TSV to learn from (overrides --data-dir's)")
    p.add_argument("--valid", default="", help="NSMC-format TSV for validation loss (overrides --data-dir's)")
    p.add_argument("--out", required=True, help="output directory (Hugging Face model + tokenizer)")
    p.add_argument("--from-scratch", action="store_true", help="small GPT-2 and a BPE tokenizer trained on the data")
    p.add_argument("--pretrained", default="skt/kogpt2-base-v2", help="hub name or local directory to fine-tune")
    p.add_argument("--vocab-size", type=int, default=8000, help="tokenizer vocabulary (--from-scratch)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48, help="truncate examples to this many tokens")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3 scratch, 5e-5 fine-tune)")
    p.add_argument("--warmup-steps", type=int, default=200,
                   help=f"learning-rate warm-up, at most {WARMUP_SHARE * 100:g}%% of the run's steps (as --max-minutes allows)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = epochs decide)")
    p.add_argument("--max-minutes", type=float, default=0, help="time budget; the schedule is fitted to it")
    p.add_argument("--eval-every", type=int, default=500, help="steps between validation passes")
    p.add_argument("--valid-size", type=int, default=2000, help="validation reviews used for val_loss")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--lightning-ckpt", action="store_true", help="also write the tutorial's Lightning-style .ckpt")
    p.add_argument("--save-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of the saved weights (float16 halves the folder; training stays float32)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N training reviews (0 = all)")
    ns = p.parse_args(argv)
    if not (ns.train and ns.valid):
        files = nsmc_files(ns.data_dir or None)
        ns.train, ns.valid = ns.train or str(files["train"]), ns.valid or str(files["test"])
    if ns.lr is None:
        ns.lr = 1e-3 if ns.from_scratch else 5e-5
    return TrainArgs(**vars(ns))


def encode(tokenizer: PreTrainedTokenizerFast, rows: list[tuple[str, int]], max_tokens: int) -> list[list[int]]:
    texts = [example_text(doc, label) for doc, label in rows]
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    # A review cut short has no end: only whole reviews teach the model to stop.
    return [ids + [eos] if len(ids) < max_tokens else ids[:max_tokens] for ids in encoded if ids]


def batches(examples: list[list[int]], batch_size: int, rng: random.Random, pad_id: int):
    """Shuffled batches of similar length (little padding), as (input_ids, attention_mask, labels)."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    chunk = batch_size * 50
    groups = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: len(examples[i]))
        groups += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(groups)
    for group in groups:
        yield collate([examples[i] for i in group], pad_id)


def collate(seqs: list[list[int]], pad_id: int):
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@torch.no_grad()
def mean_nll(model: GPT2LMHeadModel, examples: list[list[int]], pad_id: int, device: str, batch_size: int = 64) -> float:
    """Mean negative log-likelihood per predicted token."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        ids, mask, labels = collate(examples[start:start + batch_size], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        target = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((target != -100).sum())
    model.train()
    return total / max(1, count)


WARMUP_SHARE = 0.05  # the warm-up's share of a run at most, so a short run reaches its peak and anneals on time


def planned_steps(step: int, total: int, elapsed: float, budget_s: float) -> int:
    """The steps this run will make: `total`, or fewer when the time budget ends it first (at the pace so far)."""
    if not budget_s or step == 0 or elapsed <= 0:
        return total
    return max(step, min(total, int(step * budget_s / elapsed)))


def warmup_for(requested: int, planned: int) -> int:
    """--warmup-steps, held to WARMUP_SHARE of the planned steps."""
    return max(1, min(requested, int(WARMUP_SHARE * planned)))


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak as `progress` goes from 0 to 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_model_and_tokenizer(args: TrainArgs, rows: list[tuple[str, int]], out: Path):
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():  # resuming
        return GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32), load_pretrained_tokenizer(str(out))
    if args.from_scratch:
        tokenizer = train_tokenizer((example_text(d, l) for d, l in rows), args.vocab_size)
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=max(128, args.max_tokens), n_embd=args.n_embd, n_layer=args.n_layer,
            n_head=args.n_head, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        return GPT2LMHeadModel(config), tokenizer
    load_named(GPT2Config.from_pretrained, args.pretrained, TRAINING)  # fails in seconds without the hub
    tokenizer = load_pretrained_tokenizer(args.pretrained)
    return load_named(GPT2LMHeadModel.from_pretrained, args.pretrained, TRAINING), tokenizer


def save(model, tokenizer, out: Path, meta: dict, lightning: bool, dtype: str = "float32") -> None:
    # The mark that serving reads to know the label words steer this model.
    model.config.sentiment_labels = {"positive": POSITIVE, "negative": NEGATIVE}
    if dtype == "float16":
        copy.deepcopy(model).to(torch.float16).save_pretrained(out)  # a copy keeps the tied weights tied
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")
    if lightning:
        for old in out.glob("*.ckpt"):
            old.unlink()
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        torch.save({"epoch": meta["epoch"], "global_step": meta["step"], "state_dict": state},
                   out / f"epoch={meta['epoch']}-val_loss={meta['val_loss']:.4f}.ckpt")
    readable_by_all(out)


def readable_by_all(out: Path) -> None:
    """Files 0644, the folder 0755: safetensors writes 0600, which a container's own user (uid 10001) cannot read
    from a mounted model folder."""
    out.chmod(0o755)
    for path in out.iterdir():
        if path.is_file():
            path.chmod(0o644)


def train(args: TrainArgs) -> dict:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    rows = read_nsmc(Path(args.train), args.limit or None)
    valid_rows = read_nsmc(Path(args.valid), args.valid_size)
    model, tokenizer = build_model_and_tokenizer(args, rows, out)
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed load leaves no empty folder behind
    model.to(device).train()
    pad_id = tokenizer.pad_token_id
    train_ex = encode(tokenizer, rows, args.max_tokens)
    valid_ex = encode(tokenizer, valid_rows, args.max_tokens)
    steps_per_epoch = math.ceil(len(train_ex) / args.batch_size)
    total = args.max_steps or max(1, int(args.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    step, epoch, best, spent = 0, 0, float("inf"), 0.0
    state_path = out / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])  # the latest weights; `out` holds the best ones
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, best, spent = state["step"], state["epoch"], state["best"], state["spent"]
        total = args.max_steps or state["total"]  # a larger --max-steps extends a finished run
        rng.setstate(state["rng"])
        print(f"resuming at step {step}/{total}")
    budget_s = args.max_minutes * 60
    started = time.monotonic() - spent
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.1f}M parameters, {len(train_ex)} examples, vocab {len(tokenizer)}, device {device}")
    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, mininterval=2)
    history = []
    while step < total:
        for ids, mask, labels in batches(train_ex, args.batch_size, rng, pad_id):
            elapsed = time.monotonic() - started
            # With a time budget the schedule follows the clock, so the decay completes whatever the speed, and the
            # warm-up and the progress bar's total follow the steps the budget allows.
            progress = max(step / total, elapsed / budget_s if budget_s else 0.0)
            planned = planned_steps(step, total, elapsed, budget_s)
            if bar.total != planned:
                bar.total = planned
                bar.refresh()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, progress, args.lr, warmup_for(args.warmup_steps, planned))
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
            last = step >= total or (budget_s and time.monotonic() - started >= budget_s)
            if step % args.eval_every == 0 or last:
                val = mean_nll(model, valid_ex, pad_id, device)
                history.append({"step": step, "train_loss": round(loss.item(), 4), "val_loss": round(val, 4),
                                "lr": optimizer.param_groups[0]["lr"]})
                tqdm.write(f"step {step}: train_loss {loss.item():.3f} val_loss {val:.3f}")
                meta = {"step": step, "epoch": epoch, "val_loss": val, "args": asdict(args), "history": history}
                if val < best:
                    best = val
                    save(model, tokenizer, out, meta, args.lightning_ckpt, args.save_dtype)
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                            "best": best, "spent": time.monotonic() - started, "total": total, "rng": rng.getstate()},
                           state_path)
            if last:
                total = bar.total = step
                break
        else:
            epoch += 1
    bar.close()
    minutes = (time.monotonic() - started) / 60
    print(f"done: {step} steps in {minutes:.1f} min, best val_loss {best:.4f} (perplexity {math.exp(best):.1f}); "
          f"model in {out}")
    return {"steps": step, "minutes": minutes, "best_val_loss": best}


def main(argv: list[str] | None = None) -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # download progress bars stay on
    try:
        args = parse_args(argv)
        if args.threads == 0:
            torch.set_num_threads(os.cpu_count() or 1)
        train(args)
    except (UserError, ModelLoadError) as exc:
        raise SystemExit(f"core.train: {exc}") from None


if __name__ == "__main__":
    main()
