"""The one frozen settings object: TOML file plus LIVEPRED_<SECTION>__<KEY> overrides, validated once.

Also owns the naming of partitioned stream and lease keys (CONTRACT sections 6 and 9).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from handlers.errors import LivepredError

ENV_PREFIX = "LIVEPRED_"
# LIVEPRED_* names that are not overrides; any other LIVEPRED_* name must be a known key,
# so a typo (LIVEPRED_STREAMS_BATCH) is an error instead of a silently ignored setting.
RESERVED_ENV_NAMES = frozenset({"LIVEPRED_CONFIG"})

INT64_MAX = 2**63 - 1
MAX_PARTITIONS = 16384  # Redis Cluster's hash slot count: more partitions can't spread further


class ConfigError(LivepredError, ValueError):
    """Invalid configuration. `str()` is one line: `<dotted key>: <message> [from <source>]`."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        self.key = key
        self.message = " ".join(message.split())  # one line, whatever the cause said
        self.source = source
        text = f"{key}: {self.message}"
        if source:
            text += f" [from {source}]"
        super().__init__(text)

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str, str | None]]:
        return type(self), (self.key, self.message, self.source)


# --- field validators -------------------------------------------------------------------------


def _between(low: int, high: int) -> AfterValidator:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high} (got {value})")
        return value

    return AfterValidator(check)


def _at_least(low: int) -> AfterValidator:
    def check(value: int) -> int:
        if value < low:
            raise ValueError(f"must be >= {low} (got {value})")
        return value

    return AfterValidator(check)


def _one_of(*choices: str) -> AfterValidator:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)} (got {value!r})")
        return value

    return AfterValidator(check)


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _key_name(value: str) -> str:
    """A Redis key base name: the partition suffix `:{p}` must stay the only hash tag."""
    _non_empty(value)
    if "{" in value or "}" in value:
        raise ValueError(f"must not contain '{{' or '}}', the partition hash tag (got {value!r})")
    return value


def _unique_names(check_one: Callable[[str], str]) -> Callable[[tuple[str, ...]], tuple[str, ...]]:
    def check(values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            try:
                check_one(value)
            except ValueError as exc:
                raise ValueError(f"each name {exc}") from None
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ValueError(f"must not repeat a name (got {duplicates[0]!r} twice)")
        return values

    return check


def _non_empty_list(values: tuple[str, ...]) -> tuple[str, ...]:
    if not values:
        raise ValueError("must list at least one name")
    return values


def redact_url(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = f"{parts.username}:***@" if parts.username else ":***@"
        return parts._replace(netloc=user + netloc).geturl()
    except ValueError:
        return "<unparsable url>"


def _redis_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL: {exc} (got {redact_url(url)!r})") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"must start with redis://, rediss:// or unix:// (got {redact_url(url)!r})"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"must name a host (got {redact_url(url)!r})")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError(f"must name a socket path (got {redact_url(url)!r})")
    database_of(url)
    return url


def database_of(url: str) -> int:
    """The database number a redis URL selects: `/N` path or `?db=N`, default 0."""
    parts = urlsplit(url)
    text = ""
    if parts.scheme != "unix":
        text = parts.path.strip("/")
    query_db = parse_qs(parts.query).get("db")
    if query_db:
        text = query_db[-1]
    if not text:
        return 0
    if not text.isdigit():
        raise ValueError(f"has a bad database number {text!r} (got {redact_url(url)!r})")
    return int(text)


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def _device(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise ValueError(f"must be cpu, cuda or cuda:N (got {value!r})")
    return value


Name = Annotated[StrictStr, AfterValidator(_non_empty)]
KeyName = Annotated[StrictStr, AfterValidator(_key_name)]
NameList = Annotated[tuple[StrictStr, ...], AfterValidator(_unique_names(_non_empty))]
KeyNameList = Annotated[tuple[StrictStr, ...], AfterValidator(_unique_names(_key_name))]


# --- sections ---------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RedisSettings(_Section):
    url: Annotated[StrictStr, AfterValidator(_redis_url)] = "redis://127.0.0.1:6379/0"
    cluster: StrictBool = False

    @property
    def url_redacted(self) -> str:
        return redact_url(self.url)


class StreamsSettings(_Section):
    input: Annotated[KeyNameList, AfterValidator(_non_empty_list)] = ("bars",)
    output: KeyName = "predictions"
    dead_letter: KeyName = "bars:dead"
    group: KeyName = "livepred"
    consumer: StrictStr = ""  # "" = <hostname>-<pid>
    batch: Annotated[StrictInt, _between(1, 100_000)] = 512
    # Never 0: XREADGROUP BLOCK 0 waits forever and a stop request would hang on it.
    block_ms: Annotated[StrictInt, _at_least(1)] = 100
    output_maxlen: Annotated[StrictInt, _at_least(1000)] = 1_000_000
    partitions: Annotated[StrictInt, _between(1, MAX_PARTITIONS)] = 1
    partitions_owned: tuple[StrictInt, ...] = ()  # () = all
    # Of the owned partitions, those this instance serves first; it stands by for the others
    # and asks their holder to hand them back. () = all owned partitions are preferred.
    partitions_preferred: tuple[StrictInt, ...] = ()
    lease_ms: Annotated[StrictInt, _at_least(100)] = 5000

    @model_validator(mode="after")
    def _check_names_and_partitions(self) -> StreamsSettings:
        for key in ("output", "dead_letter"):
            name = getattr(self, key)
            if name in self.input:
                raise ConfigError(
                    f"streams.{key}", f"must not be one of streams.input (got {name!r})"
                )
        if self.output == self.dead_letter:
            raise ConfigError(
                "streams.dead_letter", f"must differ from streams.output (got {self.output!r})"
            )
        for p in self.partitions_owned:
            if not 0 <= p < self.partitions:
                raise ConfigError(
                    "streams.partitions_owned",
                    f"each must be between 0 and streams.partitions - 1 = "
                    f"{self.partitions - 1} (got {p})",
                )
        if len(set(self.partitions_owned)) != len(self.partitions_owned):
            raise ConfigError(
                "streams.partitions_owned",
                f"must not repeat a partition (got {list(self.partitions_owned)})",
            )
        owned = set(self.partitions_owned or range(self.partitions))
        for p in self.partitions_preferred:
            if p not in owned:
                raise ConfigError(
                    "streams.partitions_preferred",
                    f"each must be one of streams.partitions_owned (got {p})",
                )
        if len(set(self.partitions_preferred)) != len(self.partitions_preferred):
            raise ConfigError(
                "streams.partitions_preferred",
                f"must not repeat a partition (got {list(self.partitions_preferred)})",
            )
        return self


class ModelsSettings(_Section):
    run_root: Name = "runs/current"
    view: Name = "CROSS_SECTIONAL"
    targets: NameList = ()  # () = all
    families: NameList = ()  # () = all
    device: Annotated[StrictStr, AfterValidator(_device)] = "cpu"
    allow_pickle: StrictBool = True
    interval_minutes: Annotated[StrictInt, _at_least(0)] = 0  # 0 = don't check
    compile_trees: StrictBool = True  # LightGBM compiled to native code (the `trees` extra)


class StateSettings(_Section):
    symbol_ttl_s: Annotated[StrictInt, _at_least(1)] = 900
    warmup_bars: Annotated[StrictInt, _at_least(1)] = 256


class MetricsSettings(_Section):
    port: Annotated[StrictInt, _between(0, 65535)] = 9464  # 0 = off


class LogSettings(_Section):
    level: Annotated[StrictStr, _one_of("debug", "info", "warning", "error")] = "info"
    format: Annotated[StrictStr, _one_of("auto", "json", "console")] = "auto"


class Settings(_Section):
    """Everything configurable, frozen. Build it with `load_settings`."""

    redis: RedisSettings = Field(default_factory=RedisSettings)
    streams: StreamsSettings = Field(default_factory=StreamsSettings)
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @model_validator(mode="after")
    def _check_cluster(self) -> Settings:
        if self.redis.cluster:
            url = self.redis.url
            if urlsplit(url).scheme == "unix":
                raise ConfigError(
                    "redis.url",
                    "must be redis:// or rediss:// when redis.cluster is true (got a unix socket)",
                )
            database = database_of(url)
            if database != 0:
                raise ConfigError(
                    "redis.url",
                    f"must select database 0 when redis.cluster is true (got database {database})",
                )
        return self

    def consumer_name(self, hostname: str, pid: int) -> str:
        """The consumer name in the group: the configured one, or `<hostname>-<pid>`."""
        return self.streams.consumer or f"{hostname}-{pid}"

    @property
    def partitioned(self) -> bool:
        """Whether stream keys carry the `:{p}` suffix (partitions > 1, or Redis Cluster)."""
        return self.streams.partitions > 1 or self.redis.cluster

    @property
    def owned_partitions(self) -> tuple[int, ...]:
        """The partitions this instance may process, in order (`partitions_owned`, [] = all)."""
        owned = self.streams.partitions_owned
        return tuple(sorted(owned)) if owned else tuple(range(self.streams.partitions))


SECTIONS: dict[str, type[_Section]] = {
    name: info.default_factory  # type: ignore[misc]
    for name, info in Settings.model_fields.items()
}


# --- partition key naming (CONTRACT section 9) --------------------------------------------------


@dataclass(frozen=True, slots=True)
class PartitionKeys:
    """The Redis keys of one partition; `partition` is None for unsuffixed keys."""

    partition: int | None
    inputs: tuple[str, ...]
    output: str
    dead_letter: str
    lease_key: str
    preferred: bool = True  # False: stand by, take it only when free, hand it back on request
    # Where a preferred instance asks the holder to hand it back (derived from lease_key).
    handback_key: str = field(default="", compare=False)


def partition_key(name: str, partition: int | None) -> str:
    """`bars` -> `bars:{3}` for partition 3; unchanged for None (unpartitioned)."""
    return name if partition is None else f"{name}:{{{partition}}}"


def partition_for_symbol(symbol: str, partitions: int) -> int:
    """The partition a feeder sends `symbol` to: crc32 of its UTF-8 bytes mod `partitions`."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1 (got {partitions})")
    return zlib.crc32(symbol.encode()) % partitions


def partition_keys(settings: Settings) -> list[PartitionKeys]:
    """The keys of every partition this instance owns (all of them for `partitions_owned = []`)."""
    streams = settings.streams
    owned: tuple[int | None, ...] = settings.owned_partitions if settings.partitioned else (None,)
    preferred = set(streams.partitions_preferred)
    return [
        PartitionKeys(
            partition=p,
            inputs=tuple(partition_key(name, p) for name in streams.input),
            output=partition_key(streams.output, p),
            dead_letter=partition_key(streams.dead_letter, p),
            lease_key=partition_key(f"{streams.group}:lease", p),
            preferred=not preferred or p in preferred,
            handback_key=partition_key(f"{streams.group}:handback", p),
        )
        for p in owned
    ]


# --- loading ----------------------------------------------------------------------------------


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read the TOML file (if any), apply LIVEPRED_* overrides from `environ`, validate.

    `environ` defaults to `os.environ`; this is the only place the project reads it.
    Raises `ConfigError` naming the key (and the file or variable it came from).
    """
    if environ is None:
        environ = os.environ
    values: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    if path is not None:
        label = str(path)
        for section, table in _read_toml(Path(path), label).items():
            model = _section_model(section, label)
            if not isinstance(table, dict):
                raise ConfigError(section, f"must be a table ([{section}])", label)
            for key, value in table.items():
                _check_known_key(model, section, key, label)
                values.setdefault(section, {})[key] = value
                sources[f"{section}.{key}"] = label
    for name, text in sorted(environ.items()):
        parsed = _parse_env_name(name)
        if parsed is None:
            continue
        section, key = parsed
        model = _section_model(section, name, key)
        _check_known_key(model, section, key, name)
        values.setdefault(section, {})[key] = _parse_env_value(model, section, key, text, name)
        sources[f"{section}.{key}"] = name
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise _to_config_error(exc, sources) from None


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(label, "no such config file") from None
    except OSError as exc:
        raise ConfigError(label, f"cannot read config file: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(label, f"not UTF-8 text (at line {line})") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line L, column C)".
        raise ConfigError(label, f"invalid TOML: {exc}") from None


def _section_model(section: str, source: str, key: str | None = None) -> type[_Section]:
    model = SECTIONS.get(section)
    if model is None:
        name = f"{section}.{key}" if key else section
        raise ConfigError(name, f"unknown section (known: {', '.join(SECTIONS)})", source)
    return model


def _check_known_key(model: type[_Section], section: str, key: str, source: str) -> None:
    if key not in model.model_fields:
        known = ", ".join(model.model_fields)
        raise ConfigError(f"{section}.{key}", f"unknown key (known: {known})", source)


def _parse_env_name(name: str) -> tuple[str, str] | None:
    if not name.upper().startswith(ENV_PREFIX) or name.upper() in RESERVED_ENV_NAMES:
        return None
    section, sep, key = name[len(ENV_PREFIX) :].lower().partition("__")
    if not sep or not section or not key or "__" in key:
        raise ConfigError(
            name,
            "not a setting: overrides are named LIVEPRED_<SECTION>__<KEY>, "
            "e.g. LIVEPRED_STREAMS__BATCH",
        )
    return section, key


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _parse_env_value(model: type[_Section], section: str, key: str, text: str, source: str) -> Any:
    """Turn the variable's text into the key's type; pydantic checks ranges afterwards."""
    dotted = f"{section}.{key}"
    field = model.model_fields[key]
    kind = _base_type(field.annotation)
    if kind is bool:
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ConfigError(dotted, f"must be true or false (got {text!r})", source)
    if kind is int:
        return _parse_int(text, dotted, source)
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(dotted, f"must be a number (got {text!r})", source) from None
    if kind is tuple:
        return _parse_list(text, _item_type(field.annotation), dotted, source)
    return text


def _parse_int(text: str, dotted: str, source: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(dotted, f"must be an integer (got {text!r})", source) from None


def _parse_list(text: str, item_type: type, dotted: str, source: str) -> list[Any]:
    """A JSON array (`["a","b"]`) or comma-separated items (`a,b`); empty text = []."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ConfigError(dotted, f"is not a valid JSON list: {exc.msg}", source) from None
        if not isinstance(value, list):
            raise ConfigError(dotted, f"must be a list (got {text!r})", source)
        return value
    if not stripped:
        return []
    items = [item.strip() for item in stripped.split(",")]
    if item_type is int:
        return [_parse_int(item, dotted, source) for item in items]
    return items


def _base_type(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    origin = get_origin(annotation)
    return origin if origin is not None else annotation


def _item_type(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    args = get_args(annotation)
    return _base_type(args[0]) if args else str


_TYPE_MESSAGES = {
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "extra_forbidden": "unknown key",
}


def _to_config_error(exc: ValidationError, sources: Mapping[str, str]) -> ConfigError:
    """The first pydantic error as one ConfigError line naming the dotted key."""
    error = exc.errors(include_url=False)[0]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return ConfigError(cause.key, cause.message, sources.get(cause.key))
    loc = error["loc"]
    names = [part for part in loc if isinstance(part, str)]
    indexes = [part for part in loc if isinstance(part, int)]
    key = ".".join(names)
    if cause is not None:
        message = str(cause)
    elif error["type"] in _TYPE_MESSAGES:
        message = f"{_TYPE_MESSAGES[error['type']]} (got {error['input']!r})"
    else:
        message = error["msg"]
    if indexes:
        message = f"item {indexes[0]}: {message}"
    return ConfigError(key, message, sources.get(key) or sources.get(".".join(names[:1])))


def prefixed_settings(
    url: str, run_root: str | Path, prefix: str, consumer: str, **streams: str
) -> Settings:
    """Settings whose streams and group all live under `prefix` (demo, bench, tests): the
    keys of one such run never meet another's and are easy to delete afterwards."""
    environ = {
        "LIVEPRED_REDIS__URL": url,
        "LIVEPRED_MODELS__RUN_ROOT": str(run_root),
        "LIVEPRED_METRICS__PORT": "0",
        "LIVEPRED_STREAMS__INPUT": f"{prefix}bars",
        "LIVEPRED_STREAMS__OUTPUT": f"{prefix}predictions",
        "LIVEPRED_STREAMS__DEAD_LETTER": f"{prefix}bars:dead",
        "LIVEPRED_STREAMS__GROUP": f"{prefix}livepred",
        "LIVEPRED_STREAMS__CONSUMER": consumer,
        "LIVEPRED_LOG__LEVEL": "warning",
    }
    environ.update({f"LIVEPRED_STREAMS__{k.upper()}": v for k, v in streams.items()})
    return load_settings(None, environ)
