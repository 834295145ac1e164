"""The models chats may choose between: `[model]` (the default) and each `[models.<name>]`, each its own backend
(local or remote, its own device and quantization). A model that fails to load is reported by name and left out;
the others serve. `model=<name>` in a request picks one (it is not a sampling knob: it picks who samples)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from core.errors import UserError

log = logging.getLogger(__name__)

# The name is one word with no "=" in it: in `model= top_p=0.9` the next word is a knob, not a model name.
_MODEL_RE = re.compile(r"(?<!\S)(?:model|모델)\s*[=＝](?:\s*([^\s=＝]+)(?!\S))?", re.IGNORECASE)


@dataclass
class Models:
    backends: dict[str, object]  # name → backend (core.engine.Engine or core.remote_engine.RemoteEngine)
    default: str
    failed: dict[str, str] = field(default_factory=dict)  # name → why it did not load

    @classmethod
    def single(cls, name: str, backend: object) -> Models:
        return cls({name: backend}, name)

    @property
    def names(self) -> list[str]:
        return list(self.backends)

    def get(self, name: str | None) -> object:
        return self.backends[self.check(name)]

    def check(self, name: str | None) -> str:
        """`name` if it is served ("" or None: the default); else a UserError listing the choices."""
        if not name:
            return self.default
        if name in self.backends:
            return name
        why = f" — 불러오지 못했습니다 ({self.failed[name]})" if name in self.failed else ""
        raise UserError(f"모델 '{name}'은(는) 쓸 수 없습니다{why}. 쓸 수 있는 모델: {', '.join(self.names)} "
                        f"(unknown or unavailable model; choose one of {', '.join(self.names)})")

    def describe(self, current: str) -> str:
        """Every model, the chat's marked, with whether its labels steer it; failed ones with their reason."""
        lines = []
        for name, backend in self.backends.items():
            mark = "▶" if name == current else "•"
            steer = "라벨로 감성 조절됨 (labels steer it)" if getattr(backend, "sentiment", True) else \
                "라벨로 감성이 조절되지 않음 (labels do not steer it)"
            lines.append(f"{mark} {name} — {steer}")
        lines += [f"✗ {name} — 불러오지 못함 (failed to load): {why}" for name, why in self.failed.items()]
        return "\n".join(lines)

    async def drain(self, grace: float) -> int:
        left = 0
        for backend in self.backends.values():
            left += await backend.drain(grace)
        return left

    async def stop(self) -> None:
        for backend in self.backends.values():
            await backend.stop()


def take_model(text: str) -> tuple[str, str | None]:
    """`긍정 아 model=kogpt2 top_p=0.9` → ("긍정 아  top_p=0.9", "kogpt2"); no `model=` → (text, None)."""
    found = _MODEL_RE.search(text)
    if found is None:
        return text, None
    if not found.group(1):
        raise UserError("'model=' 뒤에 모델 이름이 없습니다. /model 로 목록을 보세요. (missing model name after 'model=')")
    return text[: found.start()] + text[found.end():], found.group(1)


async def start_models(per_model: Mapping[str, object], start) -> Models:  # noqa: ANN001 (core.backends.start_backend)
    """Start every model; one that fails is logged and reported by name, and the others serve. All failing is the
    first failure, raised (nothing could serve)."""
    backends: dict[str, object] = {}
    failed: dict[str, str] = {}
    first: BaseException | None = None
    for name, settings in per_model.items():
        try:
            backends[name] = await start(settings)
        except Exception as exc:  # noqa: BLE001 (reported by name; the others still serve)
            failed[name] = str(exc).split("\n")[0][:200]
            first = first or exc
    if not backends:
        raise first  # nothing serves: the (first) reason is the error, said once
    for name, why in failed.items():
        log.error("model %r could not be loaded; the others serve: %s", name, why)
    default = next(iter(per_model))
    if default not in backends:
        default = next(iter(backends))
        log.warning("the default model failed to load; %r is the default now", default)
    models = Models(backends, default, failed)
    shared = backends[default].telemetry  # one set of metrics and one request log line format for every model
    for backend in backends.values():
        backend.telemetry = shared
    return models
