"""Memory and start-up, measured side by side in one run: CTranslate2 int8, the bot serving KoGPT2-base's shape, and
the default bot (the embedded model) after a busy minute.

    pip install -e '.[bench]'                                   # ctranslate2, for the reference row only
    git archive <commit> | tar -x -C /tmp/before                # optional: the checkout to compare with
    python benchmarks/memory.py --baseline /tmp/before          # ~6 minutes on 2 cores

Rows (each its own process, rows interleaved `--repeats` times, medians reported):
  ctranslate2-int8   KoGPT2-base's shape (random weights, built offline as in benchmarks/engine_speed.py) converted
                     to int8 and served by `ctranslate2.Generator`: ready = from the process's start to its first
                     4-token answer; peak RSS after that answer and a 16-prompt batch of 32 new tokens each.
  bot-base           a real `python -m bot` (web only, defaults: int8 on a CPU) serving the same weights: ready = from
                     the spawn to the first answered `POST /api` (RSS then: VmRSS); peak RSS (VmHWM) after the same
                     16 requests, sent at once, each with its own knobs.
  embedded           a real `python -m bot` with the default settings (models/nsmc-small, web on): `--busy-seconds`
                     of 16 concurrent clients sending `POST /api` and `POST /api/stream` (mixed knobs, n, best_of);
                     RSS (VmRSS) at the last answer and 1 s later, and the peak (VmHWM).
  ckpt-load          `load_model` alone (defaults: int8) from a Lightning-style `.ckpt` of the same weights with an
                     optimizer state (Adam's two moments: a 1.5 GB file): peak RSS and seconds, imports included.
`--baseline DIR` adds every bot row run from another checkout of the project (suffix "-before"). Ready times include
the interpreter's start and every import; a first start after a reboot also reads the files from disk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine_speed import (  # noqa: E402
    CONCURRENT,
    NEW_TOKENS,
    build_model,
    convert_for_ctranslate2,
    ctranslate2_threads,
    knob_sets,
)

BOT_ROWS = ("bot-base", "embedded", "ckpt-load")
SETTLE_S = 1.0  # the embedded row's RSS is read this long after its last answer (an idle engine trims after 0.1 s)


def _status(pid: int | str, key: str) -> float:
    """A /proc/<pid>/status figure in MB (VmRSS: now; VmHWM: the peak since the process started)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(text.split(f"{key}:")[1].split()[0]) / 1024


def run_ctranslate2(model_dir: Path, spawned: float) -> dict:
    import ctranslate2
    from transformers import PreTrainedTokenizerFast

    converted = model_dir.parent / "ct2-int8"  # converted once by the parent, as a deployment would ship it
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    generator = ctranslate2.Generator(str(converted), device="cpu", compute_type="int8",
                                      intra_threads=ctranslate2_threads())
    prompts = [tokenizer.convert_ids_to_tokens(tokenizer(s["prompt"])["input_ids"]) for s in knob_sets()]
    options = {"include_prompt_in_result": False, "sampling_topk": 50}
    generator.generate_batch(prompts[:1], max_length=4, min_length=4, **options)
    ready = time.time() - spawned
    generator.generate_batch(prompts, max_length=NEW_TOKENS, min_length=NEW_TOKENS, **options)
    return {"ready_s": ready, "peak_rss_mb": _status("self", "VmHWM")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_bot(root: Path, work: Path, model_dir: Path | None) -> tuple[subprocess.Popen, str, float]:
    """`python -m bot` from checkout `root`, web only; the embedded model unless `model_dir`. Returns the process,
    its URL and the time it was spawned."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BOT_", "PYTHON"))}
    env.update(BOT_WEB__PORT=str(port), BOT_STORE__PATH=str(work / f"store-{port}.sqlite3"),
               BOT_LIMITS__MAX_BATCH_SIZE=str(CONCURRENT), BOT_LIMITS__REQUEST_TIMEOUT_S="600",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    if model_dir is not None:
        env.update(BOT_MODEL__PRETRAINED=str(model_dir), BOT_LIMITS__MAX_LENGTH="128")
    spawned = time.time()
    bot = subprocess.Popen([sys.executable, "-m", "bot", "--log-level", "WARNING"], cwd=root, env=env)
    return bot, f"http://127.0.0.1:{port}", spawned


def wait_ready(bot: subprocess.Popen, url: str) -> None:
    """Until the bot answers a short `POST /api` (the web server listens only once the model is loaded)."""
    body = json.dumps({"prompt": "긍정 아 정말", "max_length": 8, "min_length": 8, "seed": 1}).encode()
    while True:
        try:
            request = urllib.request.Request(url + "/api", data=body, headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=60).read()
            return
        except OSError:
            if bot.poll() is not None:
                raise RuntimeError("the bot did not start") from None
            time.sleep(0.05)


async def burst(url: str, model_dir: Path) -> None:
    """engine_speed.py's workload (b): 16 requests of 32 new tokens at once, each with its own knobs."""
    import aiohttp
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)

    async def post(http: aiohttp.ClientSession, spec: dict) -> None:
        total = len(tokenizer(spec["prompt"], add_special_tokens=False)["input_ids"]) + NEW_TOKENS
        async with http.post(url + "/api", json={**spec, "min_length": total, "max_length": total}) as resp:
            assert resp.status == 200, await resp.text()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        await asyncio.gather(*(post(http, s) for s in knob_sets()))


async def busy(url: str, seconds: float) -> int:
    """16 clients sending requests back to back for `seconds`: mixed knobs, lengths, n and best_of, some streamed.
    Returns how many were answered."""
    import aiohttp

    answered = 0
    deadline = time.monotonic() + seconds

    async def client(http: aiohttp.ClientSession, index: int) -> None:
        nonlocal answered
        rng = random.Random(index)
        specs = knob_sets()
        while time.monotonic() < deadline:
            spec = {**rng.choice(specs), "seed": rng.randrange(1 << 30), "max_length": rng.choice([16, 32, 64, 100])}
            spec["min_length"] = rng.randint(1, spec["max_length"])
            if rng.random() < 0.3:
                spec.update(n=rng.choice([1, 2]), best_of=rng.choice([1, 4]))
                spec["best_of"] = max(spec["best_of"], spec["n"])
            route = "/api/stream" if rng.random() < 0.3 else "/api"
            async with http.post(url + route, json=spec) as resp:
                await resp.read()
                assert resp.status in (200, 429), resp.status
                answered += resp.status == 200

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        await asyncio.gather(*(client(http, i) for i in range(CONCURRENT)))
    return answered


def write_ckpt(model_dir: Path) -> Path:
    """The weights as the tutorial's Lightning checkpoint holds them: `model.`-prefixed, beside an optimizer state."""
    import torch
    from safetensors.torch import load_file

    state = {f"model.{k}": v for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    moments = [{"exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v)} for v in state.values()]
    path = model_dir.parent / "epoch=1-val_loss=3.00.ckpt"
    torch.save({"epoch": 1, "state_dict": state, "optimizer_states": [{"state": dict(enumerate(moments))}]}, path)
    return path


def run_ckpt_load(root: Path, model_dir: Path, ckpt: Path) -> dict:
    """`load_model` from `ckpt` in a fresh process of checkout `root`."""
    code = ("import time, pathlib; started = time.perf_counter()\n"
            "import torch; torch.set_num_threads(1)  # as the bot loads (core.engine.start_engine)\n"
            "from core.model_loading import load_model\nfrom core.settings import ModelSettings\n"
            f"load_model(ModelSettings(pretrained={str(model_dir)!r}, checkpoint={str(ckpt)!r}))\n"
            "status = pathlib.Path('/proc/self/status').read_text()\n"
            "print(time.perf_counter() - started, int(status.split('VmHWM:')[1].split()[0]) / 1024)")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("BOT_", "PYTHON"))}, "PYTHONPATH": str(root),
           "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    seconds, peak = map(float, out.stdout.split())
    return {"ready_s": seconds, "peak_rss_mb": peak}


def run_bot_row(row: str, root: Path, work: Path, model_dir: Path, busy_seconds: float) -> dict:
    bot, url, spawned = start_bot(root, work, model_dir if row == "bot-base" else None)
    try:
        wait_ready(bot, url)
        result = {"ready_s": time.time() - spawned, "rss_ready_mb": _status(bot.pid, "VmRSS")}
        if row == "bot-base":
            asyncio.run(burst(url, model_dir))
        else:
            result["answered"] = asyncio.run(busy(url, busy_seconds))
            result["rss_at_end_mb"] = _status(bot.pid, "VmRSS")
            time.sleep(SETTLE_S)
            result["rss_after_busy_mb"] = _status(bot.pid, "VmRSS")
        result["peak_rss_mb"] = _status(bot.pid, "VmHWM")
        return result
    finally:
        bot.terminate()
        bot.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="another checkout of the project: adds the -before rows")
    parser.add_argument("--busy-seconds", type=float, default=60.0)
    parser.add_argument("--rows", nargs="+", help="a subset of: ctranslate2-int8 bot-base embedded ckpt-load (and -before)")
    parser.add_argument("--ct2-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ct2_child:
        print(json.dumps(run_ctranslate2(Path(args.ct2_child[0]), float(args.ct2_child[1]))))
        return
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    rows = ["ctranslate2-int8", *BOT_ROWS]
    if args.baseline:
        rows += [f"{r}-before" for r in BOT_ROWS]
    rows = [r for r in rows if not args.rows or r in args.rows]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = work / "kogpt2-shape"
        print("building a random GPT-2 with kogpt2-base-v2's shape …", flush=True)
        build_model(model_dir)
        if "ctranslate2-int8" in rows:
            convert_for_ctranslate2(model_dir)
        ckpt = write_ckpt(model_dir) if any(r.startswith("ckpt-load") for r in rows) else None
        runs: dict[str, list[dict]] = {row: [] for row in rows}
        for repeat in range(args.repeats):
            for row in rows:
                if row == "ctranslate2-int8":
                    out = subprocess.run([sys.executable, __file__, "--ct2-child", str(model_dir), str(time.time())],
                                         capture_output=True, text=True, check=True,
                                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                else:
                    root = args.baseline.resolve() if row.endswith("-before") else ROOT
                    if row.startswith("ckpt-load"):
                        result = run_ckpt_load(root, model_dir, ckpt)
                    else:
                        result = run_bot_row(row.removesuffix("-before"), root, work, model_dir, args.busy_seconds)
                runs[row].append(result)
                print(f"  run {repeat + 1}/{args.repeats} {row}: {json.dumps(result)}", flush=True)
    keys = ("ready_s", "rss_ready_mb", "peak_rss_mb", "rss_at_end_mb", "rss_after_busy_mb")
    med = {row: {k: statistics.median(r[k] for r in rs) if k in rs[0] else None for k in keys} for row, rs in runs.items()}
    print()
    print(f"{'row':<24} {'ready s':>8} {'RSS ready MB':>13} {'peak RSS MB':>12} {'RSS at end MB':>14} "
          f"{'1 s later MB':>13}")
    for row in rows:
        m = med[row]
        ready, end, after = (f"{m[k]:.0f}" if m[k] is not None else "-"
                             for k in ("rss_ready_mb", "rss_at_end_mb", "rss_after_busy_mb"))
        print(f"{row:<24} {m['ready_s']:>8.1f} {ready:>13} {m['peak_rss_mb']:>12.0f} {end:>14} {after:>13}")
    from core.cpus import usable_cpus

    print(f"\nmedians of {args.repeats} interleaved runs; busy: {args.busy_seconds:.0f} s of {CONCURRENT} concurrent "
          f"clients; {usable_cpus()} usable CPUs (host: {os.cpu_count()})")


if __name__ == "__main__":
    main()
