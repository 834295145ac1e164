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


def _cached_snapshot(name: str) -> Path | None:
    """Where the cache keeps the `main` snapshot of hub model `name` (it may not exist)."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + name.replace("/", "--"))
    revision = "main"
    if (ref := repo / "refs" / revision).is_file():
        revision = ref.read_text(encoding="utf-8").strip()
    return repo / "snapshots" / revision if revision and "/" not in revision else None


def hub_file(name: str, filename: str, local_files_only: bool = False, optional: bool = False) -> Path | None:
    """`filename` of the model directory `name`, else of the hub model `name`: from the local cache, else (unless
    `local_files_only`) downloaded. None where the model has no such file; an `optional` file that a cached snapshot
    lacks counts as none (a snapshot downloaded whole has every file). Only a download imports huggingface_hub's
    HTTP client."""
    if (directory := Path(name)).is_dir():
        return directory / filename if (directory / filename).is_file() else None
    # The local Hugging Face cache, in its documented layout, without huggingface_hub's HTTP client.
    if (snapshot := _cached_snapshot(name)) is not None:
        if (snapshot.parents[1] / ".no_exist" / snapshot.name / filename).is_file():
            return None  # the cache's record that the hub model has no such file
        if (snapshot / filename).is_file():
            return snapshot / filename
        if optional and local_files_only and snapshot.is_dir():
            return None
    if local_files_only:
        raise OSError(f"{filename} of {name} is not in the local Hugging Face cache")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(name, filename))
    except EntryNotFoundError:
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
