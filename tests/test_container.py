"""The container's promises, read from the Dockerfile, compose.yaml and friends (no Docker engine needed),
and the HEALTHCHECK command against a running web app."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from aiohttp.test_utils import TestServer

from bot import healthcheck
from bot.web import create_app
from core.service import BotCore
from core.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def index(pred) -> int:
    return next(i for i, ins in enumerate(instructions()) if pred(*ins))


def env() -> dict[str, str]:
    values = {}
    for word, rest in instructions():
        if word == "ENV":
            values.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return values


def torch_pin(text: str) -> str:
    pins = set(re.findall(r"torch==([\w.+]+)", text))
    assert len(pins) == 1, pins
    return pins.pop()


def test_torch_pin_is_the_same_everywhere_within_the_declared_range_and_cpu_only():
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_req = next(Requirement(d) for d in pyproject["project"]["dependencies"] if Requirement(d).name == "torch")
    pin = torch_pin((ROOT / "Dockerfile").read_text())
    assert torch_pin((ROOT / ".ci" / "run").read_text()) == pin
    assert pin in torch_req.specifier  # the image and CI install a torch the package accepts
    torch_run = next(rest for word, rest in instructions() if word == "RUN" and "torch==" in rest)
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_run


def test_ci_tests_the_lowest_transformers_pyproject_accepts():
    from packaging.requirements import Requirement
    from packaging.version import Version

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    req = next(Requirement(d) for d in pyproject["project"]["dependencies"] if Requirement(d).name == "transformers")
    lower = next(Version(s.version) for s in req.specifier if s.operator == ">=")
    tested = re.findall(r"transformers==([\w.]+)", (ROOT / ".ci" / "run").read_text())
    assert [Version(v) for v in tested] == [lower]


def test_layers_are_ordered_so_code_changes_do_not_reinstall_dependencies():
    torch = index(lambda w, r: w == "RUN" and "torch==" in r)
    pyproject = index(lambda w, r: w == "COPY" and r.startswith("pyproject.toml"))
    project = index(lambda w, r: w == "RUN" and "pip install" in r and "-e ." in r)
    source = index(lambda w, r: w == "COPY" and r.split()[0] == ".")
    assert torch < pyproject < project < source
    # The project is installed the way the README and .ci/run install it (editable), minus the test extra.
    assert "-e ." in (ROOT / ".ci" / "run").read_text().replace("'.[test]'", ".")


def test_image_settings_are_ones_the_bot_accepts(monkeypatch: pytest.MonkeyPatch):
    for key, val in env().items():
        if key.startswith("BOT_"):
            monkeypatch.setenv(key, val)
    settings = load_settings()
    assert settings.web.host == "0.0.0.0" and settings.store.path.startswith("/data/")


def test_runs_as_a_non_root_user_that_owns_the_data_volume():
    users = [rest for word, rest in instructions() if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    uid = users[-1].split(":")[0]
    assert uid.isdigit()  # numeric: checkable by Kubernetes runAsNonRoot
    assert index(lambda w, r: w == "USER") < index(lambda w, r: w == "CMD")
    assert any(word == "RUN" and f"chown -R {uid}" in rest and "/data" in rest for word, rest in instructions())
    assert any(word == "VOLUME" and "/data" in rest for word, rest in instructions())
    values = env()
    assert values["HF_HOME"].startswith("/data/") and values["BOT_STORE__PATH"].startswith("/data/")
    assert values["BOT_WEB__HOST"] == "0.0.0.0"


def test_healthcheck_and_cmd_are_exec_form():
    health = next(rest for word, rest in instructions() if word == "HEALTHCHECK")
    assert json.loads(health.split("CMD", 1)[1]) == ["python", "-m", "bot.healthcheck"]
    cmd = next(rest for word, rest in instructions() if word == "CMD")
    assert json.loads(cmd) == ["python", "-m", "bot"]
    assert instructions()[0][1].startswith("python:3.11-slim")


def _docker_pattern(pattern: str) -> re.Pattern:
    """A .dockerignore line as Docker (moby/patternmatcher) compiles it: `*` and `?` stay within one path segment,
    `**/` spans any number of them, and a pattern is anchored at the context's root."""
    pattern, out, i = pattern.strip("/"), "^", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out += ".*" if i >= len(pattern) else "(.*/)?"
            continue
        ch = pattern[i]
        out += "[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch)
        i += 1
    return re.compile(out + "$")


def in_build_context(path: str) -> bool:
    """Whether Docker sends `path` to the build: the last matching line wins; a line matches a path or its parents."""
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    excluded = False
    parts = path.split("/")
    for rule in (r for r in rules if r and not r.startswith("#")):
        negated = rule.startswith("!")
        regex = _docker_pattern(rule.lstrip("!"))
        if any(regex.match("/".join(parts[: n + 1])) for n in range(len(parts))):
            excluded = not negated
    return not excluded


@pytest.mark.parametrize("path", [
    ".env", "deploy/.env", ".git/config", "data/bot.sqlite3", "runs/nsmc-small/model.safetensors",
    # regression: `secrets/` (compose and the README create it) and weights in subfolders went into the image
    "secrets/telegram_token", "deploy/secrets/discord", "experiments/run3/epoch=1-val_loss=2.10.ckpt",
    "some/folder/model.safetensors", "old/pytorch_model.bin", "models/other/model.safetensors", "notes/best.pt",
])
def test_build_context_leaves_out_secrets_state_and_weights(path):
    assert not in_build_context(path)


@pytest.mark.parametrize("path", [
    "models/nsmc-small/model.safetensors", "models/nsmc-small/tokenizer.json", "models/nsmc-small/config.json",
    "models/nsmc-small/MODEL_CARD.md", "core/engine.py", "bot/web_page.html", "settings.toml", "README.md",
])
def test_build_context_keeps_the_code_and_the_embedded_default_model(path):
    assert in_build_context(path)


def test_env_file_is_not_committed():
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_user_is_created_before_the_code_is_copied():
    """So a code change does not redo it (the layers before `COPY . .` stay cached)."""
    user = index(lambda w, r: w == "RUN" and "useradd" in r)
    assert user < index(lambda w, r: w == "COPY" and r.split()[0] == ".")


def test_one_image_name_in_dockerfile_readme_and_compose():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    name = compose["services"]["bot"]["image"]
    readme = (ROOT / "README.md").read_text()
    assert set(re.findall(r"docker build -t (\S+)", readme + (ROOT / "Dockerfile").read_text())) == {name}
    assert "not been run" not in readme and "not built" not in readme


def test_compose_example_wires_tokens_the_checkpoint_mount_and_volume(monkeypatch: pytest.MonkeyPatch):
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    bot = compose["services"]["bot"]
    assert bot["build"] == "." and bot["env_file"] == ".env"
    mounts = {m.split(":")[1]: m.split(":")[0] for m in bot["volumes"]}
    assert mounts["/data"] in compose["volumes"]  # a named volume for cache and store
    assert "/checkpoints" in mounts  # for your own model (README); the default is the embedded one
    assert "environment" not in bot or "BOT_MODEL__PRETRAINED" not in bot["environment"]
    assert "depends_on" not in bot  # an optional dependency breaks podman-compose and Compose < 2.20
    # Every variable the example env file sets is a setting the bot accepts.
    example = (ROOT / ".env.example").read_text()
    pairs = re.findall(r"^(BOT_\w+)=(.*)$", example, re.MULTILINE)
    assert {"BOT_TELEGRAM__TOKEN", "BOT_DISCORD__TOKEN"} <= {key for key, _ in pairs}
    for key, val in pairs:
        monkeypatch.setenv(key, val)
    load_settings()


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is installed by .ci/run")
def test_hadolint_passes():
    out = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


async def test_healthcheck_command_reports_the_running_bot(core: BotCore):
    async with TestServer(create_app(core), host="127.0.0.1") as server:
        url = f"http://127.0.0.1:{server.port}/healthz"
        assert await asyncio.to_thread(healthcheck.main, [url]) == 0
        assert await asyncio.to_thread(healthcheck.main, [f"http://127.0.0.1:{server.port}/nope"]) == 1
    assert await asyncio.to_thread(healthcheck.main, [url]) == 1  # server gone
