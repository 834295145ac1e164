"""Measure a model: does the text follow the label, and at what cost to fluency, diversity and length?

    pip install -e '.[eval]'
    python -m core.evaluate --model models/nsmc-small --data-dir ../shared/data/nsmc --json eval.json

Sentiment control: for each label, continuations of neutral openings are generated through the bot's own engine
and judged by a classifier trained on ratings_train.txt (TF-IDF over character and word n-grams + logistic
regression; its accuracy on ratings_test.txt is reported beside, so the number can be trusted). Two sets of
openings: `dev` (used while building the model and choosing defaults) and `holdout` (never looked at while tuning);
the report gives both. Each `--best-of` value is measured on the same openings and seeds, with diversity
(distinct-2), loop rate, length and the share of near-empty texts, so a rerank cannot win by picking degenerate text.
Fluency: mean token NLL of ratings_test.txt reviews in the training format (label, review, end of text).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import replace
from pathlib import Path

from core.knobs import Knobs
from core.training import text_metrics
from core.training.data import nsmc_files, read_nsmc
from core.training.train import encode, mean_nll
from core.types import NEGATIVE, POSITIVE, GenRequest

# Openings that lean neither way, so the label alone decides the sentiment.
OPENINGS = {
    "dev": ("이 영화는", "배우들의 연기는", "스토리가", "솔직히", "처음에는", "감독이", "오랜만에 본 영화인데",
            "주인공이", "음악은", "결말이"),
    "holdout": ("어제 친구랑", "이번 작품은", "원작을 읽고 봤는데", "두 시간 동안", "평점 보고 골랐는데", "극장에서",
                "아이들과 함께", "특히 마지막 장면은", "전체적으로", "이 배우"),
}


def train_judge(train_path: Path, test_path: Path):
    """The sentiment judge: returns (predict, accuracy on the test file)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    train = read_nsmc(train_path)
    test = read_nsmc(test_path)
    features = make_union(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), min_df=3, sublinear_tf=True, max_features=300_000),
        TfidfVectorizer(analyzer="word", ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=200_000),
    )
    clf = make_pipeline(features, LogisticRegression(C=2.0, max_iter=2000))
    clf.fit([d for d, _ in train], [y for _, y in train])
    accuracy = float(clf.score([d for d, _ in test], [y for _, y in test]))
    return clf.predict, accuracy


async def generate_samples(engine, openings: tuple[str, ...], per_opening: int, knobs: Knobs) -> dict[str, list]:
    """Generations per label (opening + continuation, without the label word), all submitted together."""
    out: dict[str, list] = {}
    for label in (POSITIVE, NEGATIVE):
        requests = [GenRequest(label, opening, replace(knobs, seed=seed, n=1))
                    for opening in openings for seed in range(per_opening)]
        out[label] = await asyncio.gather(*(engine.generate(engine.prepare(r)) for r in requests))
    return out


def score_samples(samples: dict[str, list], predict) -> dict:
    report: dict = {"control": {}, "examples": {}}
    conts: list[str] = []
    for label, gens in samples.items():
        texts = [g.request.prompt + g.continuations[0] for g in gens]
        wanted = 1 if label == POSITIVE else 0
        report["control"][label] = sum(int(p) == wanted for p in predict(texts)) / len(texts)
        report["examples"][label] = texts[:: max(1, len(texts) // 5)][:5]
        conts += [g.continuations[0] for g in gens]
        if gens[0].confidence is not None:
            report.setdefault("model_confidence", {})[label] = sum(g.confidence[0] for g in gens) / len(gens)
    report["control"]["mean"] = (report["control"][POSITIVE] + report["control"][NEGATIVE]) / 2
    report["distinct_2"] = text_metrics.distinct_2(conts)
    report["repetition_rate"] = text_metrics.repetition_rate(conts)
    report["mean_chars"] = text_metrics.mean_chars(conts)
    report["short_rate"] = text_metrics.short_rate(conts)
    return report


def evaluate(args: argparse.Namespace) -> dict:
    import torch

    from core.engine import Engine
    from core.model_loading import load_model
    from core.settings import load_settings

    files = {} if args.train and args.test else nsmc_files(args.data_dir or None)
    train_path, test_path = Path(args.train or files["train"]), Path(args.test or files["test"])
    settings = load_settings(
        model={"pretrained": args.model, "checkpoint": "", "quantize": args.quantize},
        limits={"max_batch_size": 64, "queue_size": 10_000, "request_timeout_s": 600, "max_length": 128,
                "max_rows_per_request": 16},
        # --engine-url: generated through a remote server by the bot's remote backend (its tokenizer is --model's)
        engine={"backend": "openai", "url": args.engine_url, "timeout_s": 600} if args.engine_url else {},
    )
    base = Knobs(**{**settings.generation.model_dump(), **{k: v for k, v in (
        ("min_length", args.min_length), ("max_length", args.max_length), ("top_k", args.top_k), ("top_p", args.top_p),
        ("temperature", args.temperature), ("repetition_penalty", args.repetition_penalty)) if v is not None}})
    report: dict = {"model": args.model, "engine_url": args.engine_url, "quantize": args.quantize, "knobs": base.as_dict(), "samples_per_label": {}, "runs": {}, "fluency": {}}
    started = time.monotonic()
    predict, accuracy = train_judge(train_path, test_path)
    report["judge_test_accuracy"] = accuracy
    print(f"judge trained in {time.monotonic() - started:.0f} s: test accuracy {accuracy:.3f}", flush=True)

    loaded = load_model(settings.model)
    sets = ("dev", "holdout") if args.openings == "both" else (args.openings,)

    async def run() -> None:
        if args.engine_url:
            from core.backends import start_backend

            engine = await start_backend(settings)
        else:
            engine = Engine(loaded, settings)
            engine.start()
        try:
            for best_of in args.best_of:
                for accept in (args.accept if best_of > 1 else [engine.accept]):
                    engine.accept = accept
                    for which in sets:
                        t0 = time.monotonic()
                        samples = await generate_samples(engine, OPENINGS[which], args.samples,
                                                         replace(base, best_of=best_of))
                        result = score_samples(samples, predict)
                        result["seconds"] = time.monotonic() - t0
                        name = f"best_of={best_of}" + (f" accept={accept or 'max'}" if len(args.accept) > 1 else "")
                        report["runs"][f"{name} {which}"] = result
                        report["samples_per_label"][which] = len(OPENINGS[which]) * args.samples
                        print(f"{name} {which}: control {result['control']['mean']:.1%} distinct-2 "
                              f"{result['distinct_2']:.3f} ({result['seconds']:.0f} s)", flush=True)
        finally:
            await engine.stop()

    asyncio.run(run())
    reviews = encode(loaded.tokenizer, read_nsmc(test_path, args.nll_reviews), 128)
    served = "int8" if loaded.source.endswith("(int8)") else "fp32"
    variants = {served: loaded.model}  # the model that generated is measured as it is, not loaded again
    for name, quantize in (("fp32", "none"), ("int8", "int8")):
        if name not in variants and (name == "fp32" or args.int8):
            variants[name] = load_model(settings.model.model_copy(update={"quantize": quantize})).model
    for name, model in sorted(variants.items()):
        with torch.inference_mode():
            nll = mean_nll(model, reviews, loaded.tokenizer.pad_token_id, "cpu")
        report["fluency"][name] = {"mean_nll": nll, "perplexity": math.exp(nll), "reviews": len(reviews)}
    return report


def print_table(report: dict) -> None:
    runs = report["runs"]
    names = list(runs)
    rows = [
        ("control, 긍정", lambda r: f"{r['control'][POSITIVE]:.1%}"),
        ("control, 부정", lambda r: f"{r['control'][NEGATIVE]:.1%}"),
        ("control, mean", lambda r: f"{r['control']['mean']:.1%}"),
        ("distinct-2", lambda r: f"{r['distinct_2']:.3f}"),
        ("repetition rate", lambda r: f"{r['repetition_rate']:.1%}"),
        ("mean length (chars)", lambda r: f"{r['mean_chars']:.1f}"),
        ("near-empty (< 5 chars)", lambda r: f"{r['short_rate']:.1%}"),
        ("seconds to generate", lambda r: f"{r['seconds']:.0f}"),
    ]
    width = max(16, *(len(n) for n in names))
    print()
    print(f"| {'metric':<24} | " + " | ".join(f"{n:>{width}}" for n in names) + " |")
    print(f"| {'-' * 24} | " + " | ".join("-" * (width - 1) + ":" for _ in names) + " |")
    for title, cell in rows:
        print(f"| {title:<24} | " + " | ".join(f"{cell(runs[n]):>{width}}" for n in names) + " |")
    print(f"\nsamples per label and run: {report['samples_per_label']}")
    print(f"judge's own accuracy on ratings_test.txt: {report['judge_test_accuracy']:.1%}")
    for name, f in report["fluency"].items():
        print(f"mean token NLL, {name} ({f['reviews']} reviews): {f['mean_nll']:.3f} (perplexity {f['perplexity']:.1f})")
    print(f"knobs: {report['knobs']}")


def main(argv: list[str] | None = None) -> None:
    import transformers

    from core.errors import ModelLoadError, UserError
    from core.settings import SettingsError

    transformers.logging.set_verbosity_error()
    p = argparse.ArgumentParser(prog="python -m core.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face model directory (e.g. models/nsmc-small)")
    p.add_argument("--data-dir", default="", help="local NSMC copy; default: the downloaded, cached NSMC")
    p.add_argument("--train", default="", help="judge training file (overrides --data-dir's)")
    p.add_argument("--test", default="", help="judge test / NLL file (overrides --data-dir's)")
    p.add_argument("--samples", type=int, default=20, help="continuations per opening and label")
    p.add_argument("--openings", choices=("dev", "holdout", "both"), default="both")
    p.add_argument("--best-of", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated best_of values to compare (default: 1 and the chat default)")
    p.add_argument("--accept", type=lambda s: [None if x == "max" else float(x) for x in s.split(",")], default=None,
                   help="best_of acceptance thresholds to compare, 'max' = always the arg-max (default: the engine's)")
    p.add_argument("--min-length", type=int, default=None, help="default: settings.toml's [generation]")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--nll-reviews", type=int, default=500, help="ratings_test reviews for the fluency measure")
    p.add_argument("--int8", action="store_true", help="also measure NLL with int8 quantization (quality drift)")
    p.add_argument("--engine-url", default="", help="generate through this OpenAI-compatible server (vLLM, an "
                   "engine node) with the bot's remote backend; --model gives the tokenizer and the fluency measure")
    p.add_argument("--quantize", choices=("auto", "none", "int8"), default="auto",
                   help="the engine's quantization while generating (default: as the bot serves, auto)")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    try:
        if args.accept is None:
            from core.rerank import ACCEPT

            args.accept = [ACCEPT]
        if args.best_of is None:
            from core.settings import load_settings

            args.best_of = sorted({1, load_settings().generation.best_of})
        report = evaluate(args)
    except (UserError, ModelLoadError, SettingsError) as exc:
        raise SystemExit(f"core.evaluate: {exc}") from None
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
        print(f"written {args.json}")


if __name__ == "__main__":
    main()
