"""Where settings come from: the TOML file and LIVEPRED_<SECTION>__<KEY> variables, each
value parsed to its key's type, and any failure as one `ConfigError` line naming the key."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, ValidationError

from handlers.errors import LivepredError

ENV_PREFIX = "LIVEPRED_"
# LIVEPRED_* names that are not overrides; any other LIVEPRED_* name must be a known key,
# so a typo (LIVEPRED_STREAMS_BATCH) is an error instead of a silently ignored setting.
RESERVED_ENV_NAMES = frozenset({"LIVEPRED_CONFIG"})


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


def read_toml(path: Path, label: str) -> dict[str, Any]:
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


def parse_env_name(name: str) -> tuple[str, str] | None:
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


def parse_env_value(model: type[BaseModel], section: str, key: str, text: str, source: str) -> Any:
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


def to_config_error(exc: ValidationError, sources: Mapping[str, str]) -> ConfigError:
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
        shown = error["input"] if key != "redis.url" else "..."  # it may hold a password
        message = f"{_TYPE_MESSAGES[error['type']]} (got {shown!r})"
    else:
        message = error["msg"]
    if indexes:
        message = f"item {indexes[0]}: {message}"
    return ConfigError(key, message, sources.get(key) or sources.get(".".join(names[:1])))
