"""Hugging Face hub names: the local cache first, then one quick reachability probe, then the real download.

transformers retries an unreachable hub for about half a minute with a warning per try; a bot that cannot reach it
should say so in seconds, once, and say what to do instead.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from core.errors import ModelLoadError

log = logging.getLogger(__name__)
T = TypeVar("T")
PROBE_TIMEOUT_S = 5.0
PROJECT_ROOT = Path(__file__).resolve().parents[1]


SERVING = ("model.pretrained(BOT_MODEL__PRETRAINED)", "설정을 지워 내장 모델(models/nsmc-small)을 쓰세요",
           "or unset it to serve the embedded model")
TRAINING = ("--pretrained", "--from-scratch로 처음부터 학습하세요", "or train with --from-scratch")


def _names_a_path(name: str) -> bool:
    """A filesystem path, never a hub name (`owner/model`)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def unreachable_hint(name: str, where: tuple[str, str, str] = SERVING) -> str:
    setting, instead_ko, instead_en = where
    if _names_a_path(name):
        return f"{setting}: 모델 디렉터리 '{name}'이(가) 없습니다. (directory not found: {name})"
    return (
        f"'{name}'을(를) 불러올 수 없습니다: 로컬 디렉터리가 아니고 Hugging Face 허브에도 연결할 수 없습니다. "
        f"허브에 연결되는 곳에서 `hf download {name} --local-dir /models/{name.split('/')[-1]}`로 내려받아 "
        f"{setting}에 그 디렉터리를 지정하거나, {instead_ko}. (cannot load '{name}': not a local directory and the "
        f"hub is unreachable; download it where the hub is reachable and point {setting.split('(')[0]} at that "
        f"directory, {instead_en})"
    )


def hub_reachable(name: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One request, no retries: can the hub (HF_ENDPOINT) answer for `name` now?"""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/api/models/{urllib.parse.quote(name)}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code < 500 and exc.code != 429 and exc.code not in (401, 403, 404)
    except (urllib.error.URLError, OSError, TimeoutError, ValueError):
        return False


def local_dir(name: str) -> Path | None:
    """`name` as a local directory: as given (from the working directory), else inside the project (so the default
    `models/nsmc-small` works from any working directory)."""
    for path in (Path(name).expanduser(), PROJECT_ROOT / name):
        if path.is_dir():
            return path
    return None


def load_named(load: Callable[..., T], name: str, where: tuple[str, str, str] = SERVING) -> T:
    """`load(name)` for a local directory; for a hub name, the cached copy, else a download after a quick probe."""
    if (path := local_dir(name)) is not None:
        return load(str(path))
    if _names_a_path(name):
        raise ModelLoadError(unreachable_hint(name, where))
    try:
        return load(name, local_files_only=True)
    except (OSError, ValueError):
        pass  # not cached yet
    if not hub_reachable(name):
        raise ModelLoadError(unreachable_hint(name, where))
    log.info("downloading %s from the Hugging Face hub …", name)
    return load(name)
