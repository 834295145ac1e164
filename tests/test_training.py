"""Train → evaluate → serve, end to end on a sample: files written, the bot loads them, evaluate runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_model import NSMC_DIR

from core.engine import Engine
from core.grammar import parse_gen
from core.model_loading import load_model
from core.settings import load_settings
from core.training import evaluate, train


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory) -> tuple[Path, Path]:
    """A few hundred NSMC rows (or a small synthetic set where ../shared is absent)."""
    d = tmp_path_factory.mktemp("data")
    header = "id\tdocument\tlabel\n"
    for name, start in (("train.txt", 0), ("test.txt", 0)):
        source = NSMC_DIR / ("ratings_train.txt" if name == "train.txt" else "ratings_test.txt")
        if source.exists():
            lines = source.read_text(encoding="utf-8").splitlines()[1 + start:1 + start + 600]
        else:
            lines = [f"{i}\t{'정말 재밌다 최고' if i % 2 else '정말 별로다 최악'} {i}\t{i % 2}" for i in range(600)]
        (d / name).write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
    return d / "train.txt", d / "test.txt"


@pytest.fixture(scope="module")
def trained_dir(sample_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "model"
    train_file, test_file = sample_files
    train.train(train.parse_args([
        "--from-scratch", "--train", str(train_file), "--valid", str(test_file), "--valid-size", "100",
        "--vocab-size", "1500", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--max-steps", "30",
        "--eval-every", "15", "--lightning-ckpt", "--out", str(out), "--seed", "1",
    ]))
    return out


def test_training_writes_a_model_the_bot_loads(trained_dir: Path):
    assert (trained_dir / "config.json").exists() and (trained_dir / "tokenizer.json").exists()
    meta = json.loads((trained_dir / "training.json").read_text(encoding="utf-8"))
    assert meta["step"] in (15, 30) and [h["step"] for h in meta["history"]] == [15, 30]
    ckpts = list(trained_dir.glob("epoch=*-val_loss=*.ckpt"))
    assert len(ckpts) == 1
    # As a Hugging Face directory (checkpoint), and as the tutorial's Lightning file over the same pretrained dir.
    for settings in (load_settings(model={"pretrained": "unused-hub-name", "checkpoint": str(trained_dir)}),
                     load_settings(model={"pretrained": str(trained_dir), "checkpoint": str(ckpts[0])})):
        loaded = load_model(settings.model)
        assert loaded.tokenizer.eos_token == "</s>"


async def test_trained_model_serves_a_request(trained_dir: Path, tmp_path: Path):
    settings = load_settings(model={"pretrained": str(trained_dir)}, store={"path": str(tmp_path / "s.sqlite3")})
    engine = Engine(load_model(settings.model), settings)
    engine.start()
    try:
        result = await engine.generate(parse_gen("긍정 아 정말 seed=1", engine.defaults, settings.limits))
        assert result.texts()[0].startswith("긍정 아 정말")
    finally:
        await engine.stop()


def test_training_resumes_where_it_stopped(trained_dir: Path, sample_files, capsys):
    train_file, test_file = sample_files
    result = train.train(train.parse_args([
        "--from-scratch", "--train", str(train_file), "--valid", str(test_file), "--valid-size", "100",
        "--max-steps", "40", "--eval-every", "10", "--out", str(trained_dir),
    ]))
    assert "resuming at step 30/40" in capsys.readouterr().out
    assert result["steps"] == 40


def test_evaluate_prints_and_writes_the_report(trained_dir: Path, sample_files, tmp_path: Path, capsys):
    train_file, test_file = sample_files
    out = tmp_path / "eval.json"
    evaluate.main(["--model", str(trained_dir), "--train", str(train_file), "--test", str(test_file),
                   "--samples", "2", "--best-of", "1,2", "--nll-reviews", "30", "--int8", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "control, mean" in printed and "distinct-2" in printed and "NLL, int8" in printed
    report = json.loads(out.read_text(encoding="utf-8"))
    assert set(report["runs"]) == {"best_of=1 dev", "best_of=1 holdout", "best_of=2 dev", "best_of=2 holdout"}
    for run in report["runs"].values():
        assert set(run["control"]) == {"긍정", "부정", "mean"}
        assert 0 <= run["distinct_2"] <= 1 and 0 <= run["repetition_rate"] <= 1 and run["mean_chars"] >= 0
    assert 0.5 <= report["judge_test_accuracy"] <= 1.0
    assert report["fluency"]["fp32"]["mean_nll"] > 0 and report["fluency"]["int8"]["reviews"] == 30
