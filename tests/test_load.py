"""A small version of benchmarks/load_test.py: 60 concurrent /api requests against a small queue.

Nothing lost, nothing answered twice or to the wrong request, no crash; counts only, no timing assertions."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import make_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from load_test import serve_and_load


async def test_sixty_concurrent_requests_get_a_result_or_busy(tiny_dir, tmp_path):
    make_settings(tiny_dir, tmp_path)  # the tiny model is valid settings-wise
    limits = {"queue_size": 8, "max_batch_size": 4, "request_timeout_s": 60}
    report, health = await serve_and_load(tiny_dir, 60, 90.0, limits, tmp_path / "store.sqlite3")
    assert report.sent == 60 and report.lost == 0 and report.duplicated == 0 and report.errors == 0, report.lines()
    assert report.answered + report.busy == 60 and report.answered >= 1 and report.busy >= 1, report.lines()
    assert health["http_status"] == 200 and health["status"] == "ok" and health["engine_alive"]
