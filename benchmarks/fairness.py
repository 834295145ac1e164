"""Fairness: one client floods the bot, another user's small requests must still be answered promptly.

    python benchmarks/fairness.py                      # the embedded model, 32 heavy requests in flight
    python benchmarks/fairness.py --flood 64 --small 40
    python benchmarks/fairness.py --user-rows 512     # every flood request may wait: fair turns alone, no refusals

Starts a real `python -m bot` (web front end only, the settings' model) on a free port, then:

1. without the flood: one user sends `--small` small `POST /api` requests one after another (the tutorial's body,
   `{"prompt": "긍정 아 정말"}`), and their latencies are recorded;
2. with the flood: another client keeps `--flood` heavy requests in flight (`n=2, best_of=8, max_length=128`, sent
   again as soon as each is answered or refused), and the same small user sends the same requests again.

The two clients use different loopback addresses (127.0.0.2 floods, 127.0.0.3 asks), which the bot tells apart
as two users. Printed side by side: the small requests' answered count, median, p90 and max latency, and how the
flood fared (answered, refused as busy). Exit status 0 when every small request was answered.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"prompt": "긍정 아 정말"}
HEAVY = {"prompt": "긍정 아 정말", "n": 2, "best_of": 8, "max_length": 128}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session(address: str) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(local_addr=(address, 0), limit=0)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300))


async def _small_requests(url: str, count: int) -> tuple[list[float], dict[int, int]]:
    latencies, statuses = [], {}
    async with _session("127.0.0.3") as session:
        for _ in range(count):
            started = time.monotonic()
            async with session.post(url + "/api", json=SMALL) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
                if response.status == 200:
                    latencies.append(time.monotonic() - started)
    return latencies, statuses


async def _flood(url: str, in_flight: int, stop: asyncio.Event, counts: dict[int, int]) -> None:
    async with _session("127.0.0.2") as session:
        async def worker() -> None:
            while not stop.is_set():
                try:
                    async with session.post(url + "/api", json=HEAVY) as response:
                        await response.read()
                        counts[response.status] = counts.get(response.status, 0) + 1
                except aiohttp.ClientError:
                    counts[-1] = counts.get(-1, 0) + 1

        await asyncio.gather(*(worker() for _ in range(in_flight)))


def _summary(latencies: list[float], statuses: dict[int, int], count: int) -> list[str]:
    ordered = sorted(latencies) or [float("nan")]
    return [f"{len(latencies)}/{count}", f"{statistics.median(ordered):.2f} s",
            f"{ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]:.2f} s", f"{ordered[-1]:.2f} s",
            ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))]


async def _wait_up(url: str, proc: subprocess.Popen) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            if proc.poll() is not None:
                raise SystemExit(f"the bot exited with {proc.returncode}")
            try:
                async with session.get(url + "/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("the bot did not come up in 120 s")


async def main_async(args: argparse.Namespace) -> int:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BOT_")}
        env.update(BOT_ENV_FILE=os.devnull, BOT_WEB__PORT=str(port), BOT_STORE__PATH=str(Path(tmp) / "bot.sqlite3"),
                   HF_HUB_OFFLINE="1")
        if args.user_rows:
            env["BOT_LIMITS__MAX_QUEUED_ROWS_PER_USER"] = str(args.user_rows)
        proc = subprocess.Popen([sys.executable, "-m", "bot", "--log-level", "WARNING"], cwd=ROOT, env=env)
        try:
            await _wait_up(url, proc)
            await _small_requests(url, 3)  # warm-up (the thread tuner's first measurements)
            alone = await _small_requests(url, args.small)
            stop, counts = asyncio.Event(), {}
            flood = asyncio.create_task(_flood(url, args.flood, stop, counts))
            while sum(counts.values()) < args.flood:  # the flood is under way: its first round was answered
                await asyncio.sleep(0.1)
            flooded = await _small_requests(url, args.small)
            stop.set()
            await flood
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"{args.small} small requests ({SMALL}), one after another; flood: {args.flood} in flight of {HEAVY}")
    print(f"{'':22}{'answered':>10}{'median':>10}{'p90':>10}{'max':>10}   statuses")
    for name, (latencies, statuses) in (("without the flood", alone), ("with the flood", flooded)):
        answered, median, p90, top, codes = _summary(latencies, statuses, args.small)
        print(f"{name:22}{answered:>10}{median:>10}{p90:>10}{top:>10}   {codes}")
    print(f"flood responses: {dict(sorted(counts.items()))} (200 answered, 429 refused as busy, -1 connection error)")
    print(f"median ratio, with / without the flood: {statistics.median(flooded[0]) / statistics.median(alone[0]):.1f}x"
          if alone[0] and flooded[0] else "")
    return 0 if len(flooded[0]) == args.small else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=32, help="heavy requests the flooding client keeps in flight")
    parser.add_argument("--small", type=int, default=30, help="small requests the other user sends")
    parser.add_argument("--user-rows", type=int, default=0,
                        help="limits.max_queued_rows_per_user for the bot (0 = the settings' value)")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
