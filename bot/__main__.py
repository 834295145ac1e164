"""`python -m bot`: run every enabled front end; `python -m bot --check`: a start-up self-test."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

# OpenMP threads wait for the next operation by spinning 10,000 rounds, then sleeping (libgomp's default is 300,000):
# back-to-back operations stay fast, and an idle engine soon stops using the cores. With OMP_WAIT_POLICY=PASSIVE
# (no spin) a step took 30-50% longer here, even on an idle box. When another process competes for the cores, the
# engine's thread tuner (core/thread_tuner.py) measures that and uses fewer threads. Must be set before torch loads
# OpenMP; the environment wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from bot.log_limits import limit_repeats
from core.errors import ModelLoadError, UserError
from core.settings import Settings, SettingsError, load_settings

log = logging.getLogger("bot")


def _not_voice(record: logging.LogRecord) -> bool:
    # A text-only bot: discord.py's "PyNaCl/davey is not installed, voice will NOT be supported" is noise.
    return "voice will NOT be supported" not in record.getMessage()


def _quiet_libraries() -> None:
    # transformers is imported only where its model runs (a GPU, a model core/gpt2_model.py does not serve); it reads
    # this when it loads. (A CPU start never imports it, nor its "Loading weights" bar; a hub download shows its own.)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # httpx logs every request URL at INFO, and Telegram's URLs contain the bot token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("discord.client").addFilter(_not_voice)


def preflight(settings: Settings) -> list[str]:
    """Everything that can be checked without the model, checked before the minutes its load may take: secrets
    (token files are read here), the store (opened, and a write tried), and that a remote backend is not this bot's
    own engine node. Returns the enabled front ends' names."""
    from bot.runner import enabled_front_ends
    from core.chat_store import ChatStore
    from core.hops import check_not_own_node

    check_not_own_node(settings)
    fronts = [fe.name for fe in enabled_front_ends(settings)]
    ChatStore(settings.store.path).close()
    return fronts


async def _main(check: bool) -> int:
    from bot.runner import install_signal_handlers, run_front_ends
    from core.backends import start_backend
    from core.grammar import parse_gen
    from core.models import start_models
    from core.service import BotCore

    settings = load_settings()
    fronts = preflight(settings)
    started = time.monotonic()
    models = await start_models(settings.per_model(), start_backend)
    engine = models.get(None)
    log.info("models loaded in %.1f s: %s", time.monotonic() - started,
             ", ".join(f"{name} ({backend.source})" for name, backend in models.backends.items()))
    try:
        if check:
            request = parse_gen("긍정 아 정말 max_length=16 min_length=1 seed=0", engine.defaults, settings.limits)
            started = time.monotonic()
            result = await engine.generate(engine.prepare(request))
            print(f"model: {engine.source}")
            for name, why in models.failed.items():
                print(f"model {name}: failed to load: {why}")
            if hasattr(engine, "model") and "(int8)" not in engine.source:  # int8 weights are packed and not counted as parameters
                print(f"parameters: {sum(p.numel() for p in engine.model.parameters()):,}")
            # The reply's own length: new_tokens counts every sampled row (best_of candidates included). Counted after
            # the prompt, as it was generated: the continuation alone can tokenize differently (a leading word piece).
            def count(text: str) -> int:
                return len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])

            tokens = count(result.texts()[0]) - count(request.model_prompt)
            print(f"generation: {result.texts()[0]!r} ({tokens} tokens, {time.monotonic() - started:.2f} s)")
            print(f"store: {settings.store.path} (writable)")
            print(f"front ends enabled: {', '.join(fronts) or 'none'}")
            if models.failed:  # the others would serve, but the settings name a model that does not load
                print("check: failed", file=sys.stderr)
                return 1
            print("check: ok")
            return 0
        core = BotCore.create(settings, engine, models)
        stop = asyncio.Event()
        install_signal_handlers(stop)
        ok = await run_front_ends(core, stop)
        core.store.close()
        return 0 if ok else 1
    finally:
        await models.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__)
    parser.add_argument("--check", action="store_true", help="load settings and model, generate once, exit 0/1")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limit_repeats()
    _quiet_libraries()
    try:
        return asyncio.run(_main(args.check))
    except (SettingsError, ModelLoadError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.check:
            print("check: failed", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
