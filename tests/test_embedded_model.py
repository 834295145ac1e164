"""The embedded model (models/nsmc-small) as a new user gets it: it loads offline from the repository, and with the
chat defaults and fixed seeds its continuations follow the requested label.

The judge is the evaluation's (TF-IDF + logistic regression), trained here on 30,000 reviews of the NSMC copy
beside the repository. On these 2 × 40 seeded texts it judged 100 % (긍정) and 92.5 % (부정) on-label with the chat
default best_of 4, and 85 % / 67.5 % with best_of 1 (the rerank switched off), with the per-row int8 layers (the
same texts alone or batched; another CPU's vector units may round a text or two differently). The floors (each ≥ 75 %, mean ≥ 85 %) pass the first with a margin of
several standard errors of an 80-text share, and fail the second, a model that ignores the label (~50 %), or a
mangled tokenizer.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
from tiny_model import NSMC_DIR

from core.engine import Engine
from core.knobs import default_knobs
from core.model_loading import load_model
from core.settings import load_settings
from core.types import NEGATIVE, POSITIVE, GenRequest

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "nsmc-small"
# Openings from the evaluation's held-out set: never used while training the model or choosing the defaults.
OPENINGS = ("어제 친구랑", "원작을 읽고 봤는데", "전체적으로", "특히 마지막 장면은")
SEEDS = range(10)
FLOOR_EACH, FLOOR_MEAN = 0.75, 0.85


def test_the_embedded_model_is_small_and_documented():
    files = {p.name: p.stat().st_size for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"} <= set(files)
    assert sum(files.values()) <= 25 * 1024 * 1024
    assert "ㅋㅋ" in Path(MODEL_DIR / "tokenizer.json").read_text(encoding="utf-8")  # NFC: jamo as users type them


def test_settings_serve_the_embedded_model_by_default(tmp_path):
    settings = load_settings(store={"path": str(tmp_path / "s.sqlite3")})
    loaded = load_model(settings.model)
    assert loaded.sentiment and Path(loaded.source.split(" ")[0]).resolve() == MODEL_DIR.resolve()


@pytest.fixture(scope="module")
def judge():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from core.training.data import read_nsmc

    train = NSMC_DIR / "ratings_train.txt"
    if not train.exists():
        pytest.skip(f"the judge needs NSMC beside the repository ({train})")
    rows = read_nsmc(train, 30_000)
    clf = make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), min_df=3, sublinear_tf=True),
                        LogisticRegression(C=2.0, max_iter=1000))
    clf.fit([d for d, _ in rows], [y for _, y in rows])
    return clf.predict


async def test_continuations_follow_the_label(judge, tmp_path):
    settings = load_settings(store={"path": str(tmp_path / "s.sqlite3")})
    engine = Engine(load_model(settings.model), settings)
    knobs = default_knobs(settings.generation)
    engine.start()
    try:
        share = {}
        for label in (POSITIVE, NEGATIVE):
            requests = [GenRequest(label, opening, replace(knobs, seed=seed)) for opening in OPENINGS for seed in SEEDS]
            results = await asyncio.gather(*(engine.generate(engine.prepare(r)) for r in requests))
            texts = [r.request.prompt + r.continuations[0] for r in results]
            wanted = 1 if label == POSITIVE else 0
            share[label] = sum(int(p) == wanted for p in judge(texts)) / len(texts)
    finally:
        await engine.stop()
    assert min(share.values()) >= FLOOR_EACH and sum(share.values()) / 2 >= FLOOR_MEAN, share
