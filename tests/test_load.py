"""A small version of benchmarks/load_test.py: 60 concurrent /api requests against a small queue.

Nothing lost, nothing answered twice or to the wrong request, no crash; counts only, no timing assertions."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from conftest import make_settings

from core.engine import Engine, _Batch
from core.errors import BusyError
from core.gpt2_decode import DecodeBatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from load_test import serve_and_load


async def test_sixty_concurrent_requests_get_a_result_or_busy(tiny_dir, tmp_path, monkeypatch):
    make_settings(tiny_dir, tmp_path)  # the tiny model is valid settings-wise
    # No timing: the worker is held at its first decoding step until the full queue has refused a request (a fast
    # engine would otherwise drain the queue as the requests arrive, and nobody would hear "busy").
    refused = threading.Event()
    real_submit = Engine._submit

    def submit(self, prepared, streaming):
        try:
            return real_submit(self, prepared, streaming)
        except BusyError:
            refused.set()
            raise

    def held(real_step):
        def step(self, last_tokens):
            refused.wait(60)
            return real_step(self, last_tokens)
        return step

    monkeypatch.setattr(Engine, "_submit", submit)
    for batch_type in (_Batch, DecodeBatch):  # whichever the engine runs the model with
        monkeypatch.setattr(batch_type, "step", held(batch_type.step))
    limits = {"queue_size": 8, "max_batch_size": 4, "request_timeout_s": 60}
    report, health = await serve_and_load(tiny_dir, 60, 90.0, limits, tmp_path / "store.sqlite3")
    assert report.sent == 60 and report.lost == 0 and report.duplicated == 0 and report.errors == 0, report.lines()
    assert report.answered + report.busy == 60 and report.answered >= 1 and report.busy >= 1, report.lines()
    assert health["http_status"] == 200 and health["status"] == "ok" and health["engine_alive"]
