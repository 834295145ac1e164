"""Measure a checkpoint: sentiment control (does the text follow the label?) and fluency (NLL / perplexity).

    pip install -e '.[eval]'
    python -m core.evaluate --model runs/nsmc-small --json runs/nsmc-small/eval.json

Sentiment control: for each label, continuations of fixed neutral openings are generated through the bot's own
engine and judged by a TF-IDF character n-gram + logistic regression classifier trained on ratings_train.txt (its
own test accuracy is reported beside, so the number can be trusted). Fluency: mean token negative log-likelihood of
ratings_test.txt reviews in the training format (label, review, end of text).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from pathlib import Path

from core.grammar import NEGATIVE, POSITIVE, GenRequest
from core.knobs import Knobs
from core.tokenizer_training import read_nsmc
from core.train import DEFAULT_DATA, encode, mean_nll

# Openings that lean neither way, so the label alone decides the sentiment.
NEUTRAL_OPENINGS = ("이 영화는", "배우들의 연기는", "스토리가", "솔직히", "처음에는", "감독이", "오랜만에 본 영화인데",
                    "주인공이", "음악은", "결말이")


def train_classifier(train_path: Path, test_path: Path):
    """TF-IDF over character n-grams + logistic regression; returns (predict, test accuracy)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    train = read_nsmc(train_path)
    test = read_nsmc(test_path)
    clf = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), min_df=3, sublinear_tf=True, max_features=300_000),
        LogisticRegression(C=2.0, max_iter=1000),
    )
    clf.fit([d for d, _ in train], [y for _, y in train])
    accuracy = float(clf.score([d for d, _ in test], [y for _, y in test]))
    return clf.predict, accuracy


async def generate_samples(engine, per_opening: int, knobs: Knobs) -> dict[str, list[str]]:  # noqa: ANN001
    """Texts (opening + continuation, without the label word) per label, generated concurrently in batches."""
    out: dict[str, list[str]] = {}
    for label in (POSITIVE, NEGATIVE):
        requests = [GenRequest(label, opening, Knobs(**{**knobs.as_dict(), "seed": seed, "n": 1}))
                    for opening in NEUTRAL_OPENINGS for seed in range(per_opening)]
        results = await asyncio.gather(*(engine.generate(r) for r in requests))
        out[label] = [r.request.prompt + r.continuations[0] for r in results]
    return out


def evaluate(args: argparse.Namespace) -> dict:
    import torch

    from core.engine import Engine
    from core.model_loading import load_model
    from core.settings import load_settings

    report: dict = {"model": args.model, "knobs": {}, "sentiment_control": {}, "fluency": {}}
    settings = load_settings(
        model={"pretrained": args.model},
        limits={"max_batch_size": 32, "queue_size": 10_000, "request_timeout_s": 3600, "max_length": 128},
    )
    knobs = Knobs(min_length=args.min_length, max_length=args.max_length, top_p=args.top_p, top_k=args.top_k,
                  repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=0, temperature=args.temperature)
    report["knobs"] = knobs.as_dict()
    started = time.monotonic()
    predict, accuracy = train_classifier(Path(args.train), Path(args.test))
    report["classifier_test_accuracy"] = accuracy
    print(f"classifier trained in {time.monotonic() - started:.0f} s: test accuracy {accuracy:.3f}", flush=True)

    loaded = load_model(settings.model)
    engine = Engine(loaded, settings)

    async def run() -> dict[str, list[str]]:
        engine.start()
        try:
            return await generate_samples(engine, args.samples, knobs)
        finally:
            await engine.stop()

    started = time.monotonic()
    samples = asyncio.run(run())
    print(f"generated {sum(map(len, samples.values()))} continuations in {time.monotonic() - started:.0f} s", flush=True)
    for label, texts in samples.items():
        wanted = 1 if label == POSITIVE else 0
        hits = sum(int(p) == wanted for p in predict(texts))
        report["sentiment_control"][label] = hits / len(texts)
    report["sentiment_control"]["mean"] = sum(report["sentiment_control"].values()) / 2
    report["examples"] = {label: texts[:: max(1, len(texts) // 5)][:5] for label, texts in samples.items()}

    reviews = encode(loaded.tokenizer, read_nsmc(Path(args.test), args.nll_reviews), 128)
    variants = {"fp32": load_model(settings.model.model_copy(update={"quantize": "none"})).model}
    if args.int8:
        variants["int8"] = load_model(settings.model.model_copy(update={"quantize": "int8"})).model
    for name, model in variants.items():
        with torch.inference_mode():
            nll = mean_nll(model, reviews, loaded.tokenizer.pad_token_id, "cpu")
        report["fluency"][name] = {"mean_nll": nll, "perplexity": math.exp(nll), "reviews": len(reviews)}
    return report


def print_table(report: dict) -> None:
    sc = report["sentiment_control"]
    print()
    print(f"{'metric':<42} {'value':>10}")
    print(f"{'sentiment control, 긍정 (share judged positive)':<42} {sc[POSITIVE]:>10.1%}")
    print(f"{'sentiment control, 부정 (share judged negative)':<42} {sc[NEGATIVE]:>10.1%}")
    print(f"{'sentiment control, mean':<42} {sc['mean']:>10.1%}")
    print(f"{'judge (classifier) test accuracy':<42} {report['classifier_test_accuracy']:>10.1%}")
    for name, f in report["fluency"].items():
        nll_label = f"mean token NLL, {name} ({f['reviews']} reviews)"
        print(f"{nll_label:<42} {f['mean_nll']:>10.3f}")
        print(f"{'perplexity, ' + name:<42} {f['perplexity']:>10.1f}")
    print(f"knobs: {report['knobs']}")


def main(argv: list[str] | None = None) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    p = argparse.ArgumentParser(prog="python -m core.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face model directory (e.g. the output of core.train)")
    p.add_argument("--train", default=str(DEFAULT_DATA / "ratings_train.txt"))
    p.add_argument("--test", default=str(DEFAULT_DATA / "ratings_test.txt"))
    p.add_argument("--samples", type=int, default=20, help="continuations per opening and label (10 openings)")
    p.add_argument("--min-length", type=int, default=10)
    p.add_argument("--max-length", type=int, default=40)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--nll-reviews", type=int, default=500, help="ratings_test reviews for the fluency measure")
    p.add_argument("--int8", action="store_true", help="also measure NLL with int8 quantization (quality drift)")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    report = evaluate(args)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
        print(f"written {args.json}")


if __name__ == "__main__":
    main()
