"""Victim service settings: one TOML/YAML/JSON file, overridden by ``HEIST_VICTIM_*`` environment variables.

Every command that touches the victim's state finds its settings with :func:`resolve_settings`: the file
given with ``--config``, else the file named by ``HEIST_VICTIM_CONFIG``, else the defaults. Load a given
file with :meth:`Settings.from_file`; every problem (unknown key, bad value, tier a key refers to that
does not exist, unreadable file) raises :class:`SettingsError` naming the file and the field. Environment
variables win over the file: ``HEIST_VICTIM_REDIS_URL``, ``HEIST_VICTIM_ADMIN_KEY``,
``HEIST_VICTIM_QUERY_LOG__BACKEND=jsonl`` (nested fields use ``__``), and so on.

A minimal file (see ``configs/victim.toml`` for every option)::

    redis_url = "redis://127.0.0.1:6379/0"
    [[models]]
    name = "sr4x"
    source = "zoo:sr4x"          # or a .safetensors / .pt / .pt2 path
    [tiers.free]
    rate = 1.0                   # requests per second (GCRA emission rate)
    burst = 10
    quota_daily = 1000
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from defenses.monitor.config import MonitorConfig
from translators.errors import HeistError
from translators.files import atomic_write_json
from translators.paths import data_dir

CONFIG_ENV = "HEIST_VICTIM_CONFIG"
"""Environment variable naming the settings file when no ``--config`` is given (see :func:`resolve_settings`)."""

NAME_CHARS = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
"""What a client, tier or model name may be (whole string; Python's ``$`` would also let a final newline in)."""


class SettingsError(HeistError):
    """Invalid or unreadable victim settings."""

    code = "bad_settings"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def is_name(v: str) -> bool:
    """True when ``v`` is a valid client, tier or model name (:data:`NAME_CHARS`, the whole string)."""
    return re.fullmatch(NAME_CHARS, v) is not None


def check_name(v: str, what: str) -> str:
    if not is_name(v):
        raise ValueError(f"{what} {v!r} must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return v


def _validate_defenses(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from defenses.registry import DefenseConfigError, build_defenses

    try:
        build_defenses(specs)
    except DefenseConfigError as exc:
        raise ValueError(str(exc)) from None
    return specs


def _validate_levels(levels: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    for i, specs in enumerate(levels, start=1):
        try:
            _validate_defenses(specs)
        except ValueError as exc:
            raise ValueError(f"level {i}: {exc}") from None
    return levels


class ImageSettings(_Strict):
    """Input limits and mode policy (see :mod:`translators.codecs`). Per-model values override these."""

    max_bytes: int = Field(10 * 1024 * 1024, ge=64, description="largest accepted request body, in bytes")
    max_pixels: int = Field(2048 * 2048, ge=1, description="width*height limit for scale-1 models")
    alpha: Literal["white", "refuse"] = "white"
    bit16: Literal["convert", "refuse"] = "convert"
    animated: Literal["first", "refuse"] = "first"


class OutputSettings(_Strict):
    """Encoding of responses."""

    jpeg_quality: int = Field(95, ge=1, le=100)
    webp_quality: int = Field(95, ge=1, le=100)
    png_compress_level: int = Field(1, ge=0, le=9)
    gpu_jpeg: bool = Field(True, description="encode JPEG responses with nvJPEG when the model runs on CUDA")


class ModelSpec(_Strict):
    """One served model.

    ``source``: a ``.safetensors`` (+ ``.json`` card), TorchScript ``.pt`` or ``torch.export`` ``.pt2`` path,
    or ``zoo:NAME`` / ``zoo:NAME@PROFILE`` (built by ``translators.zoo.build`` when not cached).
    ``max_batch``: an integer, or ``"auto"`` to measure batch 1..``max_batch_limit`` at warm-up and keep
    the fastest (images per second). ``max_delay_ms``: how long the batcher waits for more same-shaped
    requests once the device is free. ``max_queue``: requests admitted to this model and not finished;
    beyond it the API answers 503 ``overloaded``. ``max_queue_wait_ms``: queue-time admission: a request
    whose expected wait (requests ahead / measured images per second) exceeds it gets 503 ``overloaded``
    with ``Retry-After`` at once, so latency stays bounded under overload instead of every request slowing.
    ``max_batch_limit``: the largest batch the auto probe tries; unset: 8 on CPU, 128 on CUDA.
    """

    name: str
    source: str
    device: str = "auto"
    max_batch: int | Literal["auto"] = "auto"
    max_batch_limit: int | None = Field(None, ge=1, le=256)
    max_delay_ms: float = Field(2.0, ge=0.0, le=10_000.0)
    max_queue: int = Field(64, ge=1)
    max_queue_wait_ms: float | None = Field(
        1000.0, gt=0.0, description="refuse (503) when the expected queue wait exceeds this; None: off"
    )
    probe_size: int = Field(64, ge=1, description="input side used for warm-up and the auto batch probe")
    max_pixels: int | None = Field(None, ge=1)
    max_bytes: int | None = Field(None, ge=64)
    min_side: int | None = Field(None, ge=1)
    defenses: list[dict[str, Any]] = Field(default_factory=list)
    levels: list[list[dict[str, Any]]] = Field(
        default_factory=list, description="escalation levels 1, 2, ...: defenses each level adds or strengthens"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "model name")

    @field_validator("max_batch")
    @classmethod
    def _max_batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("max_batch must be >= 1 or \"auto\"")
        return v

    @field_validator("defenses")
    @classmethod
    def _defenses(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return _validate_defenses(v)

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        return _validate_levels(v)


class TierSpec(_Strict):
    """Limits for every client of a tier.

    ``rate``: sustained requests per second (``None`` or ``"unlimited"`` = no rate limit); ``burst``: how many requests
    may arrive at once (GCRA tolerance, ``RateLimit-Limit``). ``quota_total`` / ``quota_daily``: admitted
    requests over the key's life / per UTC day (``None`` = unlimited). ``defenses`` run after the model's.
    ``levels``: escalation levels 1, 2, ... (see :mod:`victim_service.policy`); each is a list of defenses
    that level adds, or strengthens when a defense of the same name is already in the pipeline.
    """

    rate: float | None = Field(1.0, gt=0.0, allow_inf_nan=False)  # inf: say "unlimited"
    burst: int = Field(10, ge=1)
    quota_total: int | None = Field(None, ge=0)
    quota_daily: int | None = Field(None, ge=0)
    defenses: list[dict[str, Any]] = Field(default_factory=list)
    levels: list[list[dict[str, Any]]] = Field(default_factory=list)

    @field_validator("defenses")
    @classmethod
    def _defenses(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return _validate_defenses(v)

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        return _validate_levels(v)

    @field_validator("rate", mode="before")
    @classmethod
    def _rate(cls, v: Any) -> Any:
        # TOML has no null: rate = "unlimited" switches the rate limit off.
        if isinstance(v, str) and v.strip().lower() in ("unlimited", "none", "off"):
            return None
        return v

    @property
    def unlimited(self) -> bool:
        return self.rate is None and self.quota_total is None and self.quota_daily is None


def default_tiers() -> dict[str, TierSpec]:
    """Tiers used when the settings name none: ``free``, ``pro`` and ``internal`` (no limits)."""
    return {
        "free": TierSpec(rate=1.0, burst=10, quota_daily=1000),
        "pro": TierSpec(rate=10.0, burst=50, quota_daily=100_000),
        "internal": TierSpec(rate=None, burst=1),
    }


class StaticKey(_Strict):
    """An API key written in the settings (tests, campaigns). ``key`` is the plaintext (>= 16 characters)."""

    name: str
    tier: str
    key: SecretStr = Field(min_length=16)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "client name")


class QueryLogSettings(_Strict):
    """``backend``: ``auto`` = Redis Stream when ``redis_url`` is set, else JSONL; ``off`` disables the log.

    ``maxlen``: approximate Redis Stream length kept (``XADD MAXLEN ~``). ``store_images``: also keep the
    raw input bytes under ``images_dir`` (named by SHA-256); off by default.
    """

    backend: Literal["auto", "redis", "jsonl", "off"] = "auto"
    path: Path | None = None
    maxlen: int = Field(1_000_000, ge=100)
    store_images: bool = False
    images_dir: Path | None = None



def _env_origin(loc: list[str], data: dict[str, Any]) -> str | None:
    """The ``HEIST_VICTIM_*`` variable that set the invalid value at ``loc``, or None when the value came from
    the settings file or defaults: the variable named after the whole path (``HEIST_VICTIM_TIERS__FREE__RATE``),
    or one under a top-level key the file does not set (``HEIST_VICTIM_PORT``)."""
    exact = "HEIST_VICTIM_" + "__".join(loc).upper()
    top = f"HEIST_VICTIM_{loc[0].upper()}"
    for name in os.environ:
        up = name.upper()
        if up == exact or (loc[0] not in data and (up == top or up.startswith(top + "__"))):
            return f"environment variable {name}"
    return None

class Settings(BaseSettings):
    """Everything the victim service reads at start. See the module docstring and ``docs/victim-service.md``."""

    model_config = SettingsConfigDict(
        env_prefix="HEIST_VICTIM_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    data_dir: Path | None = Field(None, description="service state (key file, JSONL log); default DATA/victim")
    models: list[ModelSpec] = Field(default_factory=list)
    models_dir: Path | None = None
    models_dir_defaults: ModelSpec | None = Field(
        None, description="options applied to every model found in models_dir (name/source ignored)"
    )
    tiers: dict[str, TierSpec] = Field(default_factory=default_tiers)
    keys: list[StaticKey] = Field(default_factory=list)
    admin_key: SecretStr | None = None
    redis_url: str | None = None
    key_prefix: str = "heist:"
    redis_timeout_s: float = Field(0.5, gt=0.0)
    on_redis_error: Literal["closed", "open"] = Field(
        "closed", description="closed: 503 while Redis is unreachable; open: admit without limits"
    )
    key_cache_s: float = Field(10.0, ge=0.0, description="how long a looked-up stored key stays cached")
    query_log: QueryLogSettings = Field(default_factory=QueryLogSettings)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig, description="the query monitor (docs/monitor.md)")
    images: ImageSettings = Field(default_factory=ImageSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    defense_secret: SecretStr | None = Field(
        None, description="keys defense randomness; default: a random secret kept in data_dir"
    )
    defense_budget_ms: float | None = Field(
        None, gt=0.0, description="per-request output-defense time budget (ms); a defense that runs longer is "
        "counted in /metrics (heist_defense_over_budget_total) and logged; None = no budget")
    torch_threads: int | None = Field(None, ge=1)
    codec_threads: int | None = Field(None, ge=1, description="image decode/encode threads; default: the cores")
    amp: bool = Field(True, description="autocast (bf16/fp16) and channels_last on CUDA")
    warmup: bool = True
    batch_probe_s: float = Field(0.25, gt=0.0, description="time per candidate batch size in the auto probe")
    request_timeout_s: float = Field(60.0, gt=0.0)
    body_timeout_s: float = Field(
        30.0, gt=0.0, description="an upload that sends no bytes for this long gets 408 body_timeout")
    docs: bool = Field(True, description="serve /docs and /openapi.json")

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, v: dict[str, TierSpec]) -> dict[str, TierSpec]:
        if not v:
            raise ValueError("at least one tier is needed")
        for name in v:
            check_name(name, "tier name")
        return v

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v or any(c.isspace() for c in v):
            raise ValueError("key_prefix must be non-empty without spaces")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            return None
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return v

    @field_validator("defense_secret")
    @classmethod
    def _secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().strip():
            raise ValueError("defense_secret is empty; give a secret, or leave it out for a generated one")
        return v

    @model_validator(mode="after")
    def _cross(self) -> Settings:
        names = [m.name for m in self.models]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model names must be unique; repeated: {', '.join(sorted(dup))}")
        seen: set[str] = set()
        for k in self.keys:
            if k.tier not in self.tiers:
                raise ValueError(f"key {k.name!r} names tier {k.tier!r}, which is not defined in [tiers]")
            if k.name in seen:
                raise ValueError(f"static key names must be unique; repeated: {k.name}")
            seen.add(k.name)
        if self.admin_key is not None and len(self.admin_key.get_secret_value()) < 16:
            raise ValueError("admin_key must be at least 16 characters")
        unknown = sorted(set(self.monitor.escalation) - set(self.tiers) - {"default"})
        if unknown:
            raise ValueError(f"monitor.escalation names tier(s) {', '.join(map(repr, unknown))} not defined in "
                             f"[tiers] ({', '.join(sorted(self.tiers))}); 'default' covers the others")
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
        # Environment first, so HEIST_VICTIM_* overrides the values read from the settings file.
        return env_settings, init_settings

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_file(cls, path: str | os.PathLike[str] | None) -> Settings:
        """Read ``path`` (.toml, .yaml/.yml or .json), apply env overrides and validate; ``None`` = defaults."""
        if path is None:
            return cls.from_mapping({}, "defaults")
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise SettingsError(f"{p}: cannot read settings file ({exc.strerror or exc})") from None
        suffix = p.suffix.lower()
        try:
            if suffix == ".toml":
                data = tomllib.loads(raw.decode())
            elif suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(raw) or {}
            elif suffix == ".json":
                data = json.loads(raw)
            else:
                raise SettingsError(f"{p}: unknown settings format {suffix!r}; use .toml, .yaml or .json")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
            raise SettingsError(f"{p}: not valid {suffix[1:].upper()} ({exc})") from None
        except ImportError:
            raise SettingsError("reading YAML settings needs PyYAML (pip install pyyaml)") from None
        except Exception as exc:  # yaml.YAMLError: PyYAML is optional, so it is not imported at the top
            if type(exc).__module__.split(".")[0] != "yaml":
                raise
            raise SettingsError(f"{p}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(data, dict):
            raise SettingsError(f"{p}: the settings file must hold a table/mapping at the top level")
        base = p.absolute().parent  # absolute: the settings are copied for the workers (heist serve)
        if not isinstance(data.get("models", []) or [], list):
            raise SettingsError(f"{p}: models: must be a list of model tables ([[models]])")
        for m in data.get("models", []) or []:
            if isinstance(m, dict) and isinstance(m.get("source"), str) and not m["source"].startswith("zoo:"):
                src = Path(m["source"]).expanduser()
                m["source"] = str(src if src.is_absolute() else (base / src))
        tables = [(data, ("models_dir", "data_dir"))]
        if isinstance(data.get("query_log"), dict):
            tables.append((data["query_log"], ("path", "images_dir")))
        for table, keys in tables:
            for key in keys:
                if isinstance(table.get(key), str):
                    d = Path(table[key]).expanduser()
                    table[key] = str(d if d.is_absolute() else base / d)
        return cls.from_mapping(data, str(p))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], origin: str = "settings", *, env: bool = True) -> Settings:
        """Validate a dict (plus ``HEIST_VICTIM_*`` overrides unless ``env`` is false); errors become one-line
        :class:`SettingsError`."""
        try:
            return cls(**data) if env else cls(_env_prefix="HEIST_VICTIM_NO_ENV__", **data)
        except ValidationError as exc:
            first = exc.errors()[0]
            parts = [str(x) for x in first.get("loc", ())]
            loc = ".".join(parts)
            msg = first["msg"].removeprefix("Value error, ")
            more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
            if env and parts:
                origin = _env_origin(parts, data) or origin
            raise SettingsError(f"{origin}: {loc + ': ' if loc else ''}{msg}{more}") from None

    # ------------------------------------------------------------------ derived

    def store(self) -> StoreInfo:
        """Where API keys, limits and quotas live: Redis (URL without password + key prefix) or the data dir."""
        d = (self.data_dir if self.data_dir is not None else data_dir() / "victim").expanduser().resolve()
        if self.redis_url:
            return StoreInfo(backend="redis", redis_url=redis_url_public(self.redis_url), key_prefix=self.key_prefix,
                             data_dir=str(d))
        return StoreInfo(backend="local", data_dir=str(d))

    def state_dir(self) -> Path:
        """Where the service keeps its files (key file, JSONL log, secret): created on first use."""
        d = self.data_dir if self.data_dir is not None else data_dir() / "victim"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict that :meth:`from_mapping` reads back, secrets included (in clear)."""
        data: dict[str, Any] = json.loads(self.model_dump_json())
        if self.admin_key is not None:
            data["admin_key"] = self.admin_key.get_secret_value()
        if self.defense_secret is not None:
            data["defense_secret"] = self.defense_secret.get_secret_value()
        data["keys"] = [{"name": k.name, "tier": k.tier, "key": k.key.get_secret_value()} for k in self.keys]
        return _absolute_paths(data)

    def to_json_file(self, path: str | os.PathLike[str]) -> Path:
        """Write these settings (secrets in clear, mode 0600: the file is for a child process) as JSON, atomically."""
        return atomic_write_json(path, self.to_dict(), durable=False, mode=0o600)


def _absolute_paths(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its folder and file settings made absolute (against the working directory, where a
    relative one from an env override or a mapping points now), so a copy read from another folder (the
    workers' settings file of ``heist serve``) finds the same files."""
    def absolute(v: Any) -> Any:
        return str(Path(v).expanduser().absolute()) if isinstance(v, str) and not v.startswith("zoo:") else v

    for key in ("data_dir", "models_dir"):
        data[key] = absolute(data.get(key))
    if isinstance(data.get("query_log"), dict):
        for key in ("path", "images_dir"):
            data["query_log"][key] = absolute(data["query_log"].get(key))
    for m in data.get("models") or []:
        if isinstance(m, dict):
            m["source"] = absolute(m.get("source"))
    return data


# ---------------------------------------------------------------------------------------------- resolution


class StoreInfo(BaseModel):
    """The state a server or command reads and writes: stored API keys, rate-limit state and quotas.

    ``backend = "redis"``: the hash ``{key_prefix}keys`` and the limiter keys in the Redis at ``redis_url``
    (password removed); ``"local"``: ``keys.json`` under ``data_dir`` and an in-process limiter.
    ``data_dir`` (absolute) also holds the defense secret and the JSONL query log.
    """

    model_config = ConfigDict(frozen=True)

    backend: Literal["redis", "local"]
    redis_url: str | None = Field(None, description="Redis URL without its password (backend redis)")
    key_prefix: str | None = Field(None, description="prefix of every Redis key (backend redis)")
    data_dir: str = Field(description="absolute path of the service's data directory")

    def same_keys_as(self, other: StoreInfo) -> bool:
        """True when both read and write the same API keys (same Redis + prefix, or the same key file)."""
        if self.backend != other.backend:
            return False
        if self.backend == "redis":
            return (self.redis_url, self.key_prefix) == (other.redis_url, other.key_prefix)
        return self.data_dir == other.data_dir

    def describe(self) -> str:
        """One phrase: ``Redis redis://127.0.0.1:6379/0 (prefix heist:)`` or ``the key file /d/keys.json``."""
        if self.backend == "redis":
            return f"Redis {self.redis_url} (prefix {self.key_prefix})"
        return f"the key file {Path(self.data_dir) / 'keys.json'}"


def redis_url_public(url: str) -> str:
    """``url`` without user name or password, host lower-case, default port 6379 and database 0 spelled out.

    Two spellings of the same server compare equal (``redis://:pw@LOCALHOST`` and ``redis://localhost:6379/0``).
    """
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = (parts.hostname or "127.0.0.1").lower()
    if host == "localhost":
        host = "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    db = parts.path.strip("/") or "0"
    return f"{parts.scheme}://{host}:{parts.port or 6379}/{db}"


@dataclass(frozen=True)
class ResolvedSettings:
    """Settings plus where they came from: ``origin`` is ``--config FILE``, ``HEIST_VICTIM_CONFIG=FILE`` or
    ``defaults``; ``path`` the file read (``None`` for defaults)."""

    settings: Settings
    origin: str
    path: Path | None


def resolve_settings(
    config: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> ResolvedSettings:
    """The victim settings every command and the server use, found in one order.

    1. ``config`` (the ``--config FILE`` option), else
    2. the file named by the environment variable ``HEIST_VICTIM_CONFIG`` (when set and non-empty), else
    3. the defaults;

    then ``HEIST_VICTIM_*`` variables override single fields (``HEIST_VICTIM_REDIS_URL``,
    ``HEIST_VICTIM_TIERS__FREE__RATE``), and last the non-``None`` ``overrides`` (command-line options such as
    ``--redis-url``) win over both. Raises :class:`SettingsError` with one line naming the file and field.
    """
    env_path = os.environ.get(CONFIG_ENV, "").strip()
    if config is not None:
        path: Path | None = Path(config)
        origin = f"--config {config}"
    elif env_path:
        path, origin = Path(env_path), f"{CONFIG_ENV}={env_path}"
    else:
        path, origin = None, "defaults"
    settings = Settings.from_file(path)
    extra = {k: v for k, v in (overrides or {}).items() if v is not None}
    if extra:
        # the environment is already applied: the command line wins over it
        settings = Settings.from_mapping({**settings.to_dict(), **extra}, f"{origin} + command line", env=False)
    return ResolvedSettings(settings, origin, path)
