"""Settings: `settings.toml` (or the file named by BOT_SETTINGS), overridden by BOT_* variables from a `.env` file
in the working directory, overridden in turn by the environment.

Nested values use `__`: BOT_MODEL__CHECKPOINT, BOT_TELEGRAM__TOKEN, BOT_WEB__PORT, ...
Unknown keys, in the file or as BOT_* variables, are errors that name the key and the nearest known one.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values
from pydantic import BaseModel, Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_SETTINGS_FILE = Path(__file__).resolve().parent.parent / "settings.toml"
ENV_PREFIX = "BOT_"
NOT_SETTINGS = {"BOT_SETTINGS", "BOT_ENV_FILE"}  # BOT_* variables that are not settings keys


def env_file() -> str:
    """The .env file read: the working directory's (as docker compose reads it), or BOT_ENV_FILE's."""
    return os.environ.get("BOT_ENV_FILE", ".env")


class SettingsError(Exception):
    """A settings file or variable that cannot be used; the message names the field."""


class ModelSettings(BaseModel):
    # What chats call it (/model, model=); "" = the last part of `pretrained` (e.g. "nsmc-small").
    name: str = Field("", pattern=r"^[A-Za-z0-9._-]{0,40}$")
    # The embedded sentiment model (in the repository); "skt/kogpt2-base-v2" or a local copy for the full KoGPT2.
    pretrained: str = "models/nsmc-small"
    checkpoint: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = a GPU when torch sees one
    quantize: Literal["auto", "none", "int8"] = "auto"  # auto = int8 on the CPU, none (bf16/fp16) on a GPU
    threads: int = Field(0, ge=0, le=1024, description="torch threads; 0 = the CPUs this process may use")


class GenerationSettings(BaseModel):
    """Default knobs (the tutorial's)."""

    min_length: int = 10
    max_length: int = 20
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    temperature: float = 1.0
    # Candidates per result, reranked by how clearly the model itself reads them as the requested label.
    best_of: int = 1


class LimitsSettings(BaseModel):
    max_length: int = Field(128, ge=2, le=1024)
    # Upper bounds: past them a value stalls every request (a batch window, a timeout holding a batch slot) or the
    # shutdown, or holds more memory than any CPU host has; none of them is a useful setting.
    max_prompt_chars: int = Field(500, ge=1, le=20_000)
    max_prompt_tokens: int = Field(64, ge=1, le=1024)
    max_candidates: int = Field(3, ge=1, le=16)
    max_best_of: int = Field(8, ge=1, le=16)
    max_rows_per_request: int = Field(16, ge=1, le=64, description="cap on n × best_of (rows sampled for one request)")
    max_batch_size: int = Field(16, ge=1, le=256)
    batch_window_ms: int = Field(25, ge=0, le=1000)
    queue_size: int = Field(64, ge=1, le=10_000)
    max_queued_rows_per_user: int = Field(
        32, ge=1, le=100_000, description="rows one user may have waiting (one request always may); beyond: busy"
    )
    request_timeout_s: float = Field(60.0, gt=0, le=3600)  # an hour: offline evaluation runs long batches
    user_interval_s: float = Field(2.0, ge=0, le=3600, description="per-user minimum seconds between generations")
    daily_requests_per_user: int = Field(0, ge=0, le=1_000_000, description="generations per user per UTC day; 0 = no cap")
    shutdown_grace_s: float = Field(
        30.0, ge=0, le=600, description="on SIGTERM, how long in-flight generations may finish"
    )


class _Secrets(BaseModel):
    """A section with secrets: each is read once, when the settings are loaded (a file, then, must be a readable,
    non-empty UTF-8 regular file), so no request ever touches the file system for one."""

    _secrets: dict[str, str | None] = PrivateAttr(default_factory=dict)

    def _load(self, name: str, value: SecretStr | None, path: str, field_name: str) -> None:
        self._secrets[name] = _read_secret(value, path, field_name)

    def _secret(self, name: str, value: SecretStr | None) -> str | None:
        # The value itself when set (also after a model_copy(update=…), which validates nothing), else the file's.
        if value is not None and value.get_secret_value().strip():
            return value.get_secret_value().strip()
        return self._secrets.get(name)


class WebSettings(_Secrets):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Bearer token guarding every generation route (/api, /api/stream, /v1/*) and the page; None = open.
    api_token: SecretStr | None = None
    api_token_file: str = ""
    public_page: bool = False  # with a token: serve the page (not the generation routes) without one
    # Reverse proxies (addresses or networks) whose X-Forwarded-For names the client; others' is ignored.
    trusted_proxies: list[str] = []

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_network(value.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{value!r}은(는) IP 주소나 네트워크가 아닙니다. 예: 10.0.0.1, 172.16.0.0/12 "
                                 f"(not an IP address or network)") from None
        return values

    def proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(value.strip(), strict=False) for value in self.trusted_proxies]

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        # An empty host makes aiohttp listen on every interface: exposing the bot must be said, as 0.0.0.0.
        if not value.strip():
            raise ValueError("web.host가 비어 있습니다. 예: 127.0.0.1, 모든 인터페이스는 0.0.0.0 "
                             "(web.host is empty: name an address, 0.0.0.0 for every interface)")
        return value.strip()

    @model_validator(mode="after")
    def _read_secrets(self) -> WebSettings:
        self._load("api", self.api_token, self.api_token_file, "api_token_file")
        return self

    def api_secret(self) -> str | None:
        return self._secret("api", self.api_token)


class _TokenMixin(_Secrets):
    token: SecretStr | None = None
    token_file: str = ""

    @model_validator(mode="after")
    def _read_secrets(self) -> _TokenMixin:
        self._load("token", self.token, self.token_file, "token_file")
        return self

    def secret(self) -> str | None:
        """The token from `token`, else from `token_file` (a mounted secret), as read at start."""
        return self._secret("token", self.token)


def _read_secret(value: SecretStr | None, path: str, field_name: str) -> str | None:
    """The secret from `value`, else from the file `path`; ValueError with one sentence when it cannot be used."""
    if value is not None and value.get_secret_value().strip():
        text = value.get_secret_value().strip()
        if not _is_utf8(text):
            raise ValueError(f"{field_name.removesuffix('_file')}이(가) UTF-8이 아닙니다. (the secret is not UTF-8)")
        return text
    if not path:
        return None
    file = Path(path)
    try:
        # Not a FIFO or a device: reading one could wait forever.
        if not file.exists():
            raise ValueError(f"{field_name} {path!r}이(가) 없습니다. ({field_name} does not exist)")
        if not file.is_file():
            raise ValueError(f"{field_name} {path!r}은(는) 일반 파일이 아닙니다 (디렉터리, FIFO …). "
                             f"({field_name} is not a regular file)")
        raw = file.read_bytes()
    except OSError as exc:
        raise ValueError(f"{field_name} {path!r}을(를) 읽을 수 없습니다: {exc.strerror} ({field_name} is unreadable)") from None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{field_name} {path!r}이(가) UTF-8이 아닙니다. ({field_name} is not UTF-8)") from None
    if not text:
        raise ValueError(f"{field_name} {path!r}이(가) 비어 있습니다. 비밀 값을 넣거나 설정을 지우세요. "
                         f"({field_name} is empty: an empty secret would switch authentication off)")
    return text


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # an environment variable's undecodable bytes arrive as lone surrogates
        return False
    return True


class TelegramSettings(_TokenMixin):
    allowed_chat_ids: list[int] = []  # empty lists = everyone; otherwise a chat or a user on a list may use the bot
    allowed_user_ids: list[int] = []
    refusal: Literal["reply", "ignore"] = "reply"  # what everyone else gets: a polite Korean refusal, or nothing
    admin_user_ids: list[int] = []  # may /allow, /deny, /allowed, /stats, and are never refused by the allowlists
    base_url: str = "https://api.telegram.org/bot"
    base_file_url: str = "https://api.telegram.org/file/bot"
    webhook_url: str = ""
    webhook_listen: str = "0.0.0.0"
    webhook_port: int = Field(8443, ge=1, le=65535)
    webhook_secret: SecretStr | None = None


class DiscordSettings(_TokenMixin):
    allowed_guild_ids: list[int] = []  # empty lists = everyone; otherwise a server or a channel on a list
    allowed_channel_ids: list[int] = []
    refusal: Literal["reply", "ignore"] = "reply"
    admin_user_ids: list[int] = []  # may !allow, !deny, !allowed, !stats, and are never refused by the allowlists
    prefix: str = "!"
    guild_id: int | None = None


class EngineSettings(_Secrets):
    """Where generation runs: in this process ("local"), or an OpenAI-compatible `/v1/completions` server ("openai":
    vLLM, or another bot's engine node)."""

    backend: Literal["local", "openai"] = "local"
    url: str = ""  # the server's base URL, e.g. http://vllm:8000 (with or without /v1)
    model: str = ""  # the served model's name; "" = the first of the server's GET /v1/models
    api_key: SecretStr | None = None
    api_key_file: str = ""
    tokenizer: str = ""  # a directory or tokenizer.json counting prompt tokens; "" = model.pretrained's
    timeout_s: float = Field(60.0, gt=0, description="per HTTP attempt")
    retries: int = Field(2, ge=0, le=10, description="extra attempts after a connection error or a 5xx")

    def secret(self) -> str | None:
        """The API key from `api_key`, else from `api_key_file` (a mounted secret), as read at start."""
        return self._secret("api_key", self.api_key)

    @model_validator(mode="after")
    def _url_for_remote(self) -> EngineSettings:
        if self.backend == "openai" and not self.url.strip():
            raise ValueError(
                'backend = "openai"에는 url이 필요합니다 (예: http://vllm:8000). (backend "openai" needs engine.url)'
            )
        if self.url.strip():
            _check_url(self.url.strip(), "engine.url")
        self._load("api_key", self.api_key, self.api_key_file, "api_key_file")
        return self


def _check_url(url: str, name: str) -> None:
    """An http(s) URL with a host, or ValueError with one sentence."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises for a port that is not a number or out of range)
    except ValueError as exc:
        raise ValueError(f"{name} {url!r}은(는) 올바른 URL이 아닙니다 ({exc}). 예: http://vllm:8000 "
                         f"({name} is not a valid URL)") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name} {url!r}에는 http:// 또는 https://와 호스트가 필요합니다. 예: http://vllm:8000 "
                         f"({name} needs an http or https scheme and a host)")


class StoreSettings(BaseModel):
    path: str = "data/bot.sqlite3"

    @field_validator("path")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        # SQLite opens "" as a private temporary database: every saved setting would vanish at restart.
        if not value.strip():
            raise ValueError("저장소 경로가 비어 있습니다. SQLite 파일 경로를 지정하세요. (store.path is empty)")
        return value


class ExtraModel(BaseModel):
    """One more model chats may choose (`[models.<name>]`): its own [model] and [engine] sections; loaded at start
    beside the main one, so memory and start time grow only with the models listed."""

    model: ModelSettings = ModelSettings()
    engine: EngineSettings = EngineSettings()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BOT_",
        env_nested_delimiter="__",
        extra="forbid",
        nested_model_default_partial_update=True,
    )

    model: ModelSettings = ModelSettings()
    generation: GenerationSettings = GenerationSettings()
    limits: LimitsSettings = LimitsSettings()
    web: WebSettings = WebSettings()
    telegram: TelegramSettings = TelegramSettings()
    discord: DiscordSettings = DiscordSettings()
    store: StoreSettings = StoreSettings()
    engine: EngineSettings = EngineSettings()
    models: dict[str, ExtraModel] = {}  # more models by name, besides [model] (see ExtraModel)

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_keys(cls, data: object) -> object:
        # pydantic ignores unknown keys inside a section; a misspelt allowlist must not leave the bot open.
        if isinstance(data, Mapping):
            for path, known in unknown_keys(data, cls):
                raise ValueError(f"[{'.'.join(path[:-1]) or 'settings'}] {path[-1]}: {_unknown(path[-1], known)}")
        return data

    def model_name(self) -> str:
        return self.model.name or Path(self.model.pretrained.rstrip("/")).name or "default"

    def per_model(self) -> dict[str, Settings]:
        """Each model's name and the settings that start it (its own [model] and [engine], the rest shared)."""
        out = {self.model_name(): self}
        for name, extra in self.models.items():
            out[name] = self.model_copy(update={"model": extra.model, "engine": extra.engine, "models": {}})
        return out

    @model_validator(mode="after")
    def _model_names(self) -> Settings:
        bad = [name for name in self.models if not re.fullmatch(r"[A-Za-z0-9._-]{1,40}", name)]
        if bad:
            raise ValueError(f"[models] 모델 이름 {bad[0]!r}: 영문·숫자·._- 1–40자여야 합니다 (model names: letters, "
                             f"digits, . _ -)")
        if self.model_name() in self.models:
            raise ValueError(f"[models] {self.model_name()!r}은(는) 이미 [model]의 이름입니다 (a duplicate model name)")
        return self

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> Settings:
        # Defaults are validated by the same rules users hit, so a bad file fails at start.
        from core.errors import UserError
        from core.knobs import check_defaults

        try:
            check_defaults(self.generation, self.limits)
        except UserError as exc:
            raise ValueError(f"[generation] {exc}") from None
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = os.environ.get("BOT_SETTINGS") or DEFAULT_SETTINGS_FILE
        # Environment, then .env, then TOML: the TOML file is the default, variables override it.
        # Only settings from .env: compose's own variables may share the file (BOT_* typos are caught in load_settings).
        dotenv = DotEnvSettingsSource(settings_cls, env_file=env_file(), dotenv_filtering="only_existing")
        return (init_settings, env_settings, dotenv, TomlConfigSettingsSource(settings_cls, toml_file=toml_file))


def _fields(model: object) -> dict[str, object] | None:
    """A settings model's fields ({name: annotation}), or None for a leaf value."""
    for candidate in (model, *typing.get_args(model)):  # `Section | None` and the like
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return {name: info.annotation for name, info in candidate.model_fields.items()}
    return None


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key.lower(), known, n=1, cutoff=0.6)
    hint = f" 혹시 {close[0]}? (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"
    return f"알 수 없는 설정입니다 (unknown setting).{hint}"


def unknown_keys(data: Mapping, model: object, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], list[str]]]:
    """(path, known keys there) for each key of `data` that `model` does not have, at any depth. Derived from the
    models, so a new field or section is known as soon as it is declared."""
    fields = _fields(model) or {}
    found = []
    for key, value in data.items():
        if key not in fields:
            found.append(((*path, str(key)), sorted(fields)))
        elif isinstance(value, Mapping) and typing.get_origin(fields[key]) in (dict, Mapping):
            item_model = typing.get_args(fields[key])[1]  # a table of named sections, e.g. [models.<name>]
            for name, item in value.items():
                if isinstance(item, Mapping) and _fields(item_model) is not None:
                    found.extend(unknown_keys(item, item_model, (*path, key, str(name))))
        elif isinstance(value, Mapping) and _fields(fields[key]) is not None:
            found.extend(unknown_keys(value, fields[key], (*path, key)))
    return found


def check_variables(variables: Mapping[str, str | None], origin: str) -> None:
    """Every BOT_* variable must name a setting (BOT_SECTION__KEY); a typo fails instead of being ignored."""
    for name in variables:
        if not name.upper().startswith(ENV_PREFIX) or name.upper() in NOT_SETTINGS:
            continue
        model: object = Settings
        parts = name[len(ENV_PREFIX):].lower().split("__")
        for depth, part in enumerate(parts):
            fields = _fields(model)
            if fields is None and typing.get_origin(model) in (dict, Mapping):
                break  # a free-form mapping setting: any key below it is data
            if fields is None or part not in fields:
                known = sorted(fields or {})
                close = difflib.get_close_matches(part, known, n=1, cutoff=0.6)
                suggestion = "__".join([*parts[:depth], close[0], *parts[depth + 1:]]).upper() if close else ""
                hint = (f" 혹시 {ENV_PREFIX}{suggestion}? (did you mean {ENV_PREFIX}{suggestion}?)" if suggestion
                        else f" ({'.'.join(parts[:depth]) or 'settings'} has: {', '.join(known) or 'no keys'})")
                raise SettingsError(f"{origin}의 변수 {name}은(는) 알 수 없는 설정입니다 (unknown setting).{hint}")
            model = fields[part]


def load_settings(**overrides: object) -> Settings:
    """Load settings, turning pydantic's report into one readable error naming the field."""
    path = os.environ.get("BOT_SETTINGS")
    if path and not Path(path).is_file():
        raise SettingsError(f"BOT_SETTINGS가 가리키는 설정 파일 {path!r}이(가) 없습니다.")
    check_variables(os.environ, "환경 변수 (environment)")
    if Path(env_file()).is_file():
        try:
            variables = dotenv_values(env_file(), encoding="utf-8")
        except UnicodeDecodeError:
            raise SettingsError(f"{env_file()} 파일이 UTF-8이 아닙니다. ({env_file()} is not UTF-8)") from None
        check_variables(variables, f"{env_file()} 파일")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{'.'.join(map(str, err['loc']))}: {message}" if err["loc"] else message)
        raise SettingsError("설정 오류 (settings error) — " + "; ".join(problems)) from None
    except Exception as exc:  # noqa: BLE001 (malformed TOML)
        raise SettingsError(f"설정 파일을 읽을 수 없습니다 (cannot read settings): {exc}") from None
