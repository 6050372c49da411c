"""The one frozen settings object: TOML file plus LIVEPRED_<SECTION>__<KEY> overrides, validated
once (CONTRACT section 6). Reading and parsing the sources: `daemon.config_sources`; the keys
of each partition: `daemon.partitions`."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any
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

from daemon.config_sources import (
    ConfigError,
    parse_env_name,
    parse_env_value,
    read_toml,
    to_config_error,
)

MAX_PARTITIONS = 16384  # Redis Cluster's hash slot count: more partitions can't spread further


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


_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|pass|pwd)=)[^&#]*")


def redact_url(url: str) -> str:
    """The URL without its secrets, for logs and error messages: the password of its user
    part and a `password=` query value. Read as text, not parsed, so that a URL that does not
    parse (a password with an unencoded `/`, `#` or `@`) is masked all the same: everything
    between `://` and the last `@` but the user name."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        userinfo, _, after = rest.rpartition("@")
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        elif "@" in userinfo:  # a password's "@" unencoded: which part is the user is unsure
            userinfo = ":***"
        rest = f"{userinfo}@{after}"  # a user name alone (no password) stays
    return _SECRET_QUERY.sub(r"\1***", scheme + sep + rest)


def _redis_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:  # its text would quote the URL's parts: a password's, maybe
        raise ValueError(
            f"is not a valid URL: its host:port does not parse (got {redact_url(url)!r}; a"
            " password with / # @ : or % in it must be URL-encoded, e.g."
            " urllib.parse.quote(password, safe=''))"
        ) from None
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


def _path_name(value: str) -> str:
    """A target, view or family name: a folder of the training run, one path component."""
    _non_empty(value)
    if value in (".", "..") or any(c in value for c in "/\\\0"):
        raise ValueError(f"must be one folder name, without / or \\ (got {value!r})")
    return value


Name = Annotated[StrictStr, AfterValidator(_non_empty)]
PathName = Annotated[StrictStr, AfterValidator(_path_name)]
PathNameList = Annotated[tuple[StrictStr, ...], AfterValidator(_unique_names(_path_name))]
KeyName = Annotated[StrictStr, AfterValidator(_key_name)]
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
    block_ms: Annotated[StrictInt, _between(1, 60_000)] = 100
    output_maxlen: Annotated[StrictInt, _between(1000, 2**63 - 1)] = 1_000_000
    partitions: Annotated[StrictInt, _between(1, MAX_PARTITIONS)] = 1
    partitions_owned: tuple[StrictInt, ...] = ()  # () = all
    # Of the owned partitions, those this instance serves first; it stands by for the others
    # and asks their holder to hand them back. () = all owned partitions are preferred.
    partitions_preferred: tuple[StrictInt, ...] = ()
    lease_ms: Annotated[StrictInt, _between(100, 3_600_000)] = 5000

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
    view: PathName = "CROSS_SECTIONAL"
    targets: PathNameList = ()  # () = all
    families: PathNameList = ()  # () = all
    device: Annotated[StrictStr, AfterValidator(_device)] = "cpu"
    allow_pickle: StrictBool = True
    interval_minutes: Annotated[StrictInt, _at_least(0)] = 0  # 0 = don't check
    compile_trees: StrictBool = True  # LightGBM compiled to native code (the `trees` extra)


class StateSettings(_Section):
    symbol_ttl_s: Annotated[StrictInt, _at_least(1)] = 900
    warmup_bars: Annotated[StrictInt, _at_least(1)] = 256


class MetricsSettings(_Section):
    host: Name = "0.0.0.0"  # the address to listen on; "127.0.0.1": this host only
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
        for section, table in read_toml(Path(path), label).items():
            model = _section_model(section, label)
            if not isinstance(table, dict):
                raise ConfigError(section, f"must be a table ([{section}])", label)
            for key, value in table.items():
                _check_known_key(model, section, key, label)
                values.setdefault(section, {})[key] = value
                sources[f"{section}.{key}"] = label
    for name, text in sorted(environ.items()):
        parsed = parse_env_name(name)
        if parsed is None:
            continue
        section, key = parsed
        model = _section_model(section, name, key)
        _check_known_key(model, section, key, name)
        values.setdefault(section, {})[key] = parse_env_value(model, section, key, text, name)
        sources[f"{section}.{key}"] = name
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise to_config_error(exc, sources) from None


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
