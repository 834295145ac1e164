"""Short training runs (issue 19, item 14): the warm-up fits the run, the progress bar's total is the run's, the
files are readable by another user, and `--help` serves the result as the README does. The clock is faked."""

from __future__ import annotations

import json
import re
import stat
import types
from pathlib import Path

import pytest

from core.training import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("data")
    rows = [f"{i}\t{'정말 재밌다 최고' if i % 2 else '정말 별로다 최악'} {i}\t{i % 2}" for i in range(400)]
    for name in ("train.txt", "test.txt"):
        (d / name).write_text("id\tdocument\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return d / "train.txt", d / "test.txt"


class FakeClock:
    """One second per reading: the run's pace is one step every few seconds, whatever the machine."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 1.0
        return self.now


def test_a_time_bounded_run_warms_up_and_anneals_within_its_budget(data, tmp_path, monkeypatch, capsys):
    """Regression: warm-up was 200 steps whatever the run, so a 2-minute run ended with the rate still rising, and
    the bar's total (and so its ETA) assumed the whole epoch count."""
    monkeypatch.setattr(train, "time", types.SimpleNamespace(monotonic=FakeClock().monotonic))
    out = tmp_path / "model"
    train_file, test_file = data
    result = train.train(train.parse_args([
        "--from-scratch", "--train", str(train_file), "--valid", str(test_file), "--valid-size", "20",
        "--vocab-size", "300", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--batch-size", "8",
        "--epochs", "50", "--max-minutes", "1", "--eval-every", "1", "--lr", "1e-3", "--out", str(out),
    ]))
    steps = result["steps"]
    assert 10 <= steps < 50 * 50  # ended by the budget, long before 50 epochs
    lrs = [h["lr"] for h in json.loads((out / "training.json").read_text(encoding="utf-8"))["history"]]
    peak = max(lrs)
    assert peak == pytest.approx(1e-3, rel=0.01)  # the warm-up finished
    assert lrs.index(peak) <= 0.05 * steps + 1  # early: a share of the run, not 200 steps
    assert lrs[-1] <= 0.2 * peak  # and the rate annealed by the end of the budget
    bar = capsys.readouterr().err
    assert re.findall(r"(\d+)/(\d+) \[", bar)[-1] == (str(steps), str(steps)), bar[-400:]


def test_planned_steps_and_warmup():
    assert train.planned_steps(0, 1000, 0.0, 120) == 1000  # no pace yet
    assert train.planned_steps(10, 1000, 12.0, 120) == 100  # 10 steps in 12 s of a 120 s budget
    assert train.planned_steps(10, 50, 12.0, 120) == 50  # the step count ends it first
    assert train.planned_steps(10, 1000, 12.0, 0) == 1000  # no budget
    assert train.warmup_for(200, 167) == 8 and train.warmup_for(200, 100_000) == 200 and train.warmup_for(200, 3) == 1


def test_written_files_are_readable_by_other_users(data, tmp_path):
    """Regression: model.safetensors was written 0600; a container's own user could not read a mounted model."""
    out = tmp_path / "model"
    train_file, test_file = data
    train.train(train.parse_args([
        "--from-scratch", "--train", str(train_file), "--valid", str(test_file), "--valid-size", "20",
        "--vocab-size", "300", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--max-steps", "2",
        "--eval-every", "1", "--lightning-ckpt", "--out", str(out),
    ]))
    files = [p for p in out.iterdir() if p.is_file()]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in files}
    for path in [out, *files]:
        assert path.stat().st_mode & stat.S_IROTH, path.name


def test_help_and_readme_serve_the_result_the_same_way(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = capsys.readouterr().out
    command = re.search(r"(BOT_MODEL__\w+)=<out> python -m bot", help_text)
    assert command, help_text
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    serve = readme[readme.index("Serve the result"):]
    assert re.search(rf"{command.group(1)}=runs/\S+ python -m bot", serve[:400])
