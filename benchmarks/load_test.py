"""Overload test: N concurrent POST /api requests over loopback against the bot's web front end, in-process.

    python benchmarks/load_test.py                       # tiny random model built offline, 200 requests
    python benchmarks/load_test.py --model /models/kogpt2-base-v2 --requests 200 --queue-size 64

Every request must end, within --bound seconds, in a result (200) or the busy error (429 with {"error"}); the
process must stay up. Printed: requests sent, answered, busy, errors, lost (no answer within the bound), duplicated
(an answer that is not its own request's: each request carries its own seed, which the answer must echo),
p50/p95 latency, and the process's peak RSS (server and client share the process, so it bounds both).
Exit status 0 when nothing was lost or duplicated and nothing crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Report:
    sent: int = 0
    answered: int = 0
    busy: int = 0
    errors: int = 0
    lost: int = 0
    duplicated: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    def lines(self) -> list[str]:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return [
            f"requests sent      {self.sent}",
            f"answered (200)     {self.answered}",
            f"busy (429)         {self.busy}",
            f"errors             {self.errors}  {dict(sorted(self.statuses.items())) if self.errors else ''}".rstrip(),
            f"lost               {self.lost}",
            f"duplicated         {self.duplicated}",
            f"latency p50        {self.percentile(0.50):.2f} s",
            f"latency p95        {self.percentile(0.95):.2f} s",
            f"latency max        {max(self.latencies, default=0):.2f} s",
            f"peak RSS           {peak_mib:.0f} MiB",
        ]


async def run_load(url: str, requests: int, bound_s: float, body: dict | None = None) -> Report:
    """Send `requests` POSTs at once; each is bounded by `bound_s` (a request without an answer by then is lost)."""
    import aiohttp

    report = Report()
    seen: set[int] = set()
    base = body or {"prompt": "긍정 아 정말", "min_length": 8, "max_length": 16}

    async def one(session: aiohttp.ClientSession, seed: int) -> None:
        started = time.monotonic()
        report.sent += 1
        try:
            async with session.post(url, json={**base, "seed": seed}, timeout=aiohttp.ClientTimeout(total=bound_s)) as resp:
                data = await resp.json(content_type=None)
                status = resp.status
        except (TimeoutError, aiohttp.ClientError):
            report.lost += 1
            return
        report.latencies.append(time.monotonic() - started)
        report.statuses[status] = report.statuses.get(status, 0) + 1
        if status == 200:
            if data.get("seeds") != [seed] or seed in seen:
                report.duplicated += 1
            seen.add(seed)
            report.answered += 1
        elif status == 429 and isinstance(data.get("error"), str) and data["error"]:
            report.busy += 1
        else:
            report.errors += 1

    connector = aiohttp.TCPConnector(limit=0)  # all requests really in flight at once
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session, 1000 + i) for i in range(requests)))
    return report


async def serve_and_load(model_dir: Path, requests: int, bound_s: float, limits: dict, store: Path) -> tuple[Report, dict]:
    from aiohttp import web

    from bot.web import create_app
    from core.engine import Engine
    from core.model_loading import load_model
    from core.service import BotCore
    from core.settings import load_settings

    settings = load_settings(model={"pretrained": str(model_dir)}, store={"path": str(store)}, limits=limits)
    engine = Engine(load_model(settings.model), settings)
    engine.start()
    core = BotCore.create(settings, engine)
    runner = web.AppRunner(create_app(core), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
    try:
        report = await run_load(f"http://127.0.0.1:{port}/api", requests, bound_s)
        import aiohttp

        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            health = {**(await resp.json()), "http_status": resp.status}  # still up, still answering
        health["engine_alive"] = engine._thread is not None and engine._thread.is_alive()  # noqa: SLF001
        health["settings"] = {k: getattr(settings.limits, k) for k in ("queue_size", "max_batch_size", "request_timeout_s")}
        return report, health
    finally:
        await runner.cleanup()
        core.store.close()
        await engine.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a KoGPT2-format directory (default: a tiny random model built now)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--bound", type=float, default=120.0, help="seconds each request may take (default 120)")
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=60.0, help="the engine's request_timeout_s")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            sys.path.insert(0, str(ROOT / "tests"))
            import transformers
            from tiny_model import build_tiny

            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
            model_dir = build_tiny(Path(tmp) / "tiny")
        limits = {"queue_size": args.queue_size, "max_batch_size": args.batch, "request_timeout_s": args.timeout}
        started = time.monotonic()
        report, health = asyncio.run(serve_and_load(model_dir, args.requests, args.bound, limits, Path(tmp) / "s.sqlite3"))
    print(f"model              {model_dir if args.model else 'tiny random KoGPT2-format model (built offline)'}")
    print(f"limits             {health.pop('settings')}, per-request bound {args.bound:g} s")
    print("\n".join(report.lines()))
    print(f"wall time          {time.monotonic() - started:.1f} s")
    print(f"after the load     /healthz {health['http_status']} {health.get('status')}, engine alive: {health['engine_alive']}")
    ok = (report.lost == 0 and report.duplicated == 0 and report.errors == 0 and health["engine_alive"]
          and report.answered + report.busy == report.sent)
    print("result             " + ("OK: every request got a result or the busy error" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
