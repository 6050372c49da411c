"""Settings: defaults, TOML, environment overrides, validation messages, partition key naming."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from daemon.settings import (
    ConfigError,
    Settings,
    StreamsSettings,
    load_settings,
    redact_url,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = REPO / "config" / "livepred.toml"


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def env_error(**overrides: str) -> ConfigError:
    environ = {f"LIVEPRED_{name.upper()}": value for name, value in overrides.items()}
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ)
    return info.value


# --- defaults and loading ---------------------------------------------------------------------


def test_defaults_match_the_contract() -> None:
    s = load_settings(None, {})
    assert s == Settings()
    assert s.redis.url == "redis://127.0.0.1:6379/0"
    assert s.redis.cluster is False
    assert s.streams.input == ("bars",)
    assert s.streams.output == "predictions"
    assert s.streams.dead_letter == "bars:dead"
    assert s.streams.group == "livepred"
    assert s.streams.consumer == ""
    assert (s.streams.batch, s.streams.block_ms, s.streams.output_maxlen) == (512, 100, 1_000_000)
    assert (s.streams.partitions, s.streams.partitions_owned, s.streams.lease_ms) == (1, (), 5000)
    assert s.models.run_root == "runs/current"
    assert s.models.view == "CROSS_SECTIONAL"
    assert (s.models.targets, s.models.families) == ((), ())
    assert (s.models.device, s.models.allow_pickle, s.models.interval_minutes) == ("cpu", True, 0)
    assert (s.state.symbol_ttl_s, s.state.warmup_bars) == (900, 256)
    assert s.metrics.port == 9464
    assert (s.log.level, s.log.format) == ("info", "auto")


def test_example_config_file_equals_the_defaults() -> None:
    assert load_settings(EXAMPLE_CONFIG, {}) == Settings()


def test_example_config_lists_every_key() -> None:
    import tomllib

    data = tomllib.loads(EXAMPLE_CONFIG.read_text())
    expected = Settings().model_dump()
    assert data.keys() == expected.keys()
    for section, table in expected.items():
        assert data[section].keys() == table.keys(), section


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError):
        s.streams.batch = 5  # type: ignore[misc]
    with pytest.raises(ValidationError):
        s.streams = StreamsSettings()  # type: ignore[misc]


def test_environ_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEPRED_STREAMS__BATCH", "7")
    assert load_settings().streams.batch == 7


def test_toml_file_values(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
[redis]
url = "rediss://user:pw@redis.example:6380/2"
[streams]
input = ["bars", "bars2"]
batch = 64
partitions = 4
partitions_owned = [0, 3]
[models]
targets = ["fwd_ret_5"]
device = "cuda:1"
allow_pickle = false
""",
    )
    s = load_settings(path, {})
    assert s.redis.url == "rediss://user:pw@redis.example:6380/2"
    assert s.streams.input == ("bars", "bars2")
    assert s.streams.batch == 64
    assert s.streams.partitions_owned == (0, 3)
    assert s.models.targets == ("fwd_ret_5",)
    assert s.models.device == "cuda:1"
    assert s.models.allow_pickle is False
    assert s.state == Settings().state  # untouched sections keep their defaults


def test_env_overrides_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[streams]\nbatch = 64\nblock_ms = 50\n")
    s = load_settings(path, {"LIVEPRED_STREAMS__BATCH": "128"})
    assert s.streams.batch == 128
    assert s.streams.block_ms == 50


def test_env_parsing_of_every_type() -> None:
    s = load_settings(
        None,
        {
            "LIVEPRED_REDIS__URL": "redis://10.0.0.1:6379/0",
            "LIVEPRED_REDIS__CLUSTER": "TRUE",
            "LIVEPRED_STREAMS__INPUT": '["a", "b"]',
            "LIVEPRED_STREAMS__PARTITIONS": " 8 ",
            "LIVEPRED_STREAMS__PARTITIONS_OWNED": "1, 5",
            "LIVEPRED_STREAMS__CONSUMER": "123",
            "LIVEPRED_MODELS__TARGETS": "t1,t2",
            "LIVEPRED_MODELS__FAMILIES": "[]",
            "LIVEPRED_MODELS__ALLOW_PICKLE": "0",
            "LIVEPRED_METRICS__PORT": "0",
            "HOME": "/root",  # not ours: ignored
        },
    )
    assert s.redis.cluster is True
    assert s.streams.input == ("a", "b")
    assert s.streams.partitions == 8
    assert s.streams.partitions_owned == (1, 5)
    assert s.streams.consumer == "123"  # a str key stays a str
    assert s.models.targets == ("t1", "t2")
    assert s.models.families == ()
    assert s.models.allow_pickle is False
    assert s.metrics.port == 0


@pytest.mark.parametrize(
    "text, expected",
    [("true", True), ("1", True), ("yes", True), ("false", False), ("0", False), ("Off", False)],
)
def test_env_bools(text: str, expected: bool) -> None:
    assert load_settings(None, {"LIVEPRED_REDIS__CLUSTER": text}).redis.cluster is expected


def test_env_names_are_case_insensitive() -> None:
    s = load_settings(None, {"livepred_Streams__Batch": "9", "LIVEPRED_STATE__warmup_BARS": "3"})
    assert s.streams.batch == 9
    assert s.state.warmup_bars == 3


def test_env_empty_list() -> None:
    s = load_settings(None, {"LIVEPRED_MODELS__TARGETS": ""})
    assert s.models.targets == ()


def test_reserved_env_name_is_not_an_override() -> None:
    assert load_settings(None, {"LIVEPRED_CONFIG": "/etc/livepred/a.toml"}) == Settings()


def test_consumer_name() -> None:
    assert Settings().consumer_name("host1", 42) == "host1-42"
    s = load_settings(None, {"LIVEPRED_STREAMS__CONSUMER": "worker-a"})
    assert s.consumer_name("host1", 42) == "worker-a"


# --- errors -----------------------------------------------------------------------------------

ENV_CASES = [
    # (override, value, expected start of the message after "<key>: ")
    ("streams__batch", "0", "streams.batch: must be between 1 and 100000 (got 0)"),
    ("streams__batch", "100001", "streams.batch: must be between 1 and 100000 (got 100001)"),
    ("streams__batch", "ten", "streams.batch: must be an integer (got 'ten')"),
    ("streams__block_ms", "0", "streams.block_ms: must be between 1 and 60000 (got 0)"),
    ("streams__output_maxlen", "999",
     "streams.output_maxlen: must be between 1000 and 9223372036854775807 (got 999)"),
    ("streams__partitions", "0", "streams.partitions: must be between 1 and 16384 (got 0)"),
    ("streams__lease_ms", "99", "streams.lease_ms: must be between 100 and 3600000 (got 99)"),
    ("streams__input", "", "streams.input: must list at least one name"),
    ("streams__input", "bars,", "streams.input: each name must not be empty"),
    ("streams__input", "bars,bars", "streams.input: must not repeat a name (got 'bars' twice)"),
    ("streams__input", "[1]", "streams.input: item 0: must be a string (got 1)"),
    ("streams__input", "[bars", "streams.input: is not a valid JSON list"),
    ("streams__input", "bars{x}", "streams.input: each name must not contain '{' or '}'"),
    ("streams__output", "bars", "streams.output: must not be one of streams.input (got 'bars')"),
    ("streams__output", "", "streams.output: must not be empty"),
    ("streams__dead_letter", "bars", "streams.dead_letter: must not be one of streams.input"),
    ("streams__dead_letter", "predictions", "streams.dead_letter: must differ from streams.output"),
    ("streams__group", " ", "streams.group: must not be empty"),
    ("streams__partitions_owned", "1", "streams.partitions_owned: each must be between 0 and"),
    ("streams__partitions_owned", "x", "streams.partitions_owned: must be an integer (got 'x')"),
    ("state__symbol_ttl_s", "0", "state.symbol_ttl_s: must be >= 1 (got 0)"),
    ("state__symbol_ttl_s", "1.5", "state.symbol_ttl_s: must be an integer (got '1.5')"),
    ("state__warmup_bars", "0", "state.warmup_bars: must be >= 1 (got 0)"),
    ("metrics__port", "65536", "metrics.port: must be between 0 and 65535 (got 65536)"),
    ("metrics__port", "-1", "metrics.port: must be between 0 and 65535 (got -1)"),
    ("models__device", "gpu", "models.device: must be cpu, cuda or cuda:N (got 'gpu')"),
    ("models__view", "", "models.view: must not be empty"),
    ("models__run_root", "", "models.run_root: must not be empty"),
    ("models__targets", "a,a", "models.targets: must not repeat a name"),
    ("models__interval_minutes", "-5", "models.interval_minutes: must be >= 0 (got -5)"),
    ("models__allow_pickle", "maybe", "models.allow_pickle: must be true or false (got 'maybe')"),
    ("redis__url", "http://h:1/0", "redis.url: must start with redis://, rediss:// or unix://"),
    ("redis__url", "redis://h:99999/0", "redis.url: is not a valid URL"),
    ("redis__url", "redis:///0", "redis.url: must name a host"),
    ("redis__url", "redis://h/x", "redis.url: has a bad database number 'x'"),
    ("log__level", "loud", "log.level: must be one of debug, info, warning, error (got 'loud')"),
    ("log__format", "xml", "log.format: must be one of auto, json, console (got 'xml')"),
    ("streams__batchh", "1", "streams.batchh: unknown key (known: input, output"),
    ("foo__bar", "1", "foo.bar: unknown section (known: redis, streams"),
]


@pytest.mark.parametrize(
    "name, value, expected", ENV_CASES, ids=[f"{c[0]}={c[1]}" for c in ENV_CASES]
)
def test_env_validation_messages(name: str, value: str, expected: str) -> None:
    error = env_error(**{name: value})
    text = str(error)
    assert "\n" not in text
    assert text.startswith(expected), text
    assert text.endswith(f"[from LIVEPRED_{name.upper()}]"), text
    assert isinstance(error, ValueError)
    assert error.key == expected.split(":")[0]


def test_partitions_owned_range_uses_partitions() -> None:
    error = env_error(streams__partitions="4", streams__partitions_owned="1,4")
    assert str(error).startswith(
        "streams.partitions_owned: each must be between 0 and streams.partitions - 1 = 3 (got 4)"
    )
    error = env_error(streams__partitions="4", streams__partitions_owned="[1,1]")
    assert "must not repeat a partition (got [1, 1])" in str(error)


def test_cluster_requires_database_zero() -> None:
    error = env_error(redis__cluster="true", redis__url="redis://h:6379/3")
    assert str(error) == (
        "redis.url: must select database 0 when redis.cluster is true (got database 3) "
        "[from LIVEPRED_REDIS__URL]"
    )
    error = env_error(redis__cluster="true", redis__url="redis://h:6379?db=2")
    assert "(got database 2)" in str(error)
    error = env_error(redis__cluster="true", redis__url="unix:///run/redis.sock")
    assert str(error).startswith("redis.url: must be redis:// or rediss://")
    for url in ("redis://h:6379", "redis://h:6379/", "redis://h:6379/0", "rediss://u:p@h/0"):
        assert load_settings(None, {"LIVEPRED_REDIS__CLUSTER": "1", "LIVEPRED_REDIS__URL": url})


def test_url_error_hides_the_password() -> None:
    error = env_error(redis__url="http://user:hunter2@h:1/0")
    assert "hunter2" not in str(error)
    assert "user:***@h:1" in str(error)
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("redis://127.0.0.1:6398/0?password=S3cretPW&username=plain", "S3cretPW"),
        ("unix:///run/redis.sock?password=S3cretPW&db=1", "S3cretPW"),
        ("redis://lp:p@ss:w/rd#?%x@127.0.0.1:6398/0", "ss:w/rd"),  # unencoded: no parse
        ("redis://plain:pa#ss@127.0.0.1:6398/0", "pa#ss"),
        ("redis://:abc/def@h:1/0", "abc/def"),
    ],
)
def test_no_form_of_a_password_in_a_url_is_ever_shown(
    url: str, secret: str, tmp_path: Path
) -> None:
    # A query-string password (redis-py reads it) was never masked; an unencoded one made
    # the URL unparsable, and the error showed it whole, or quoted its first letters.
    assert secret not in redact_url(url) and "***" in redact_url(url)
    try:
        settings = load_settings(None, {"LIVEPRED_REDIS__URL": url})
    except ConfigError as exc:
        assert secret not in str(exc) and f"'{secret[:2]}'" not in str(exc)
    else:
        assert secret not in redact_url(settings.redis.url)
    config = tmp_path / "livepred.toml"
    config.write_text(f"[redis]\nurl = [{url!r}]\n")
    with pytest.raises(ConfigError) as typed:
        load_settings(config, {})
    assert secret not in str(typed.value) and "must be a string" in str(typed.value)


@pytest.mark.parametrize("value", ["a/b", ".", "..", "x/../CROSS_SECTIONAL", "/etc"])
def test_a_view_target_or_family_must_be_one_folder_name(value: str) -> None:
    # A "/" in models.view reached the loader: a traceback and exit 1 (a restart loop).
    for key in ("view", "targets", "families"):
        raw = value if key == "view" else f'["{value}"]'
        with pytest.raises(ConfigError) as error:
            load_settings(None, {f"LIVEPRED_MODELS__{key.upper()}": raw})
        assert str(error.value).startswith(f"models.{key}: ") and "one folder name" in str(
            error.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [("output_maxlen", "99999999999999999999"), ("lease_ms", "99999999999999"),
     ("block_ms", "600001")],
)
def test_stream_numbers_redis_would_refuse_are_config_errors(key: str, value: str) -> None:
    # Past int64 Redis refused every write or read: the partition failed for ever, and an
    # output XADD before the refused trim stayed in the stream at every retry.
    with pytest.raises(ConfigError) as error:
        load_settings(None, {f"LIVEPRED_STREAMS__{key.upper()}": value})
    assert str(error.value).startswith(f"streams.{key}: must be between")


def test_unix_socket_url_is_valid() -> None:
    s = load_settings(None, {"LIVEPRED_REDIS__URL": "unix:///run/redis.sock?db=1"})
    assert s.redis.url == "unix:///run/redis.sock?db=1"


def test_malformed_env_name() -> None:
    error = env_error(streams_batch="5")
    assert str(error).startswith("LIVEPRED_STREAMS_BATCH: not a setting")
    error = env_error(streams__batch__x="5")
    assert str(error).startswith("LIVEPRED_STREAMS__BATCH__X: not a setting")


TOML_CASES = [
    ("[streams]\nbatch = 0\n", "streams.batch: must be between 1 and 100000 (got 0)"),
    ("[streams]\nbatch = true\n", "streams.batch: must be an integer (got True)"),
    ("[streams]\nbatch = 5.0\n", "streams.batch: must be an integer (got 5.0)"),
    ('[streams]\nbatch = "5"\n', "streams.batch: must be an integer (got '5')"),
    ('[streams]\ninput = "bars"\n', "streams.input: must be a list (got 'bars')"),
    ("[streams]\nbatchh = 5\n", "streams.batchh: unknown key"),
    ("[stream]\nbatch = 5\n", "stream: unknown section"),
    ("streams = 5\n", "streams: must be a table ([streams])"),
    ('[redis]\ncluster = "yes"\n', "redis.cluster: must be true or false (got 'yes')"),
    ("[redis]\nurl = 5\n", "redis.url: must be a string (got '...')"),  # never shown
    (
        '[streams]\npartitions_owned = ["0"]\n',
        "streams.partitions_owned: item 0: must be an integer",
    ),
]


@pytest.mark.parametrize("text, expected", TOML_CASES)
def test_toml_validation_messages(tmp_path: Path, text: str, expected: str) -> None:
    path = write_toml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(expected), message
    assert message.endswith(f"[from {path}]"), message


def test_cross_field_error_names_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[redis]\nurl = "redis://h/1"\ncluster = true\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    assert str(info.value) == (
        f"redis.url: must select database 0 when redis.cluster is true (got database 1) "
        f"[from {path}]"
    )


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    assert str(info.value) == f"{path}: no such config file"


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[streams]\nbatch = 5\nblock_ms = \n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 3" in message
    assert "\n" not in message


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"[streams]\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    assert str(info.value) == f"{path}: not UTF-8 text (at line 2)"


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ValidationError):
        StreamsSettings(batch=0)
    with pytest.raises(ValidationError):
        StreamsSettings(unknown=1)  # type: ignore[call-arg]


def test_config_error_survives_pickling() -> None:
    import pickle

    error = ConfigError("streams.batch", "must be between 1 and 100000 (got 0)", "config.toml")
    again = pickle.loads(pickle.dumps(error))
    assert (
        str(again)
        == str(error)
        == ("streams.batch: must be between 1 and 100000 (got 0) [from config.toml]")
    )
    assert (again.key, again.source) == ("streams.batch", "config.toml")
