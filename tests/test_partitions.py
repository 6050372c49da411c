"""The keys of each partition and a symbol's partition (`daemon.partitions`, CONTRACT
section 9), from settings as the daemon loads them."""

from __future__ import annotations

import zlib

import pytest

from daemon.partitions import PartitionKeys, partition_for_symbol, partition_key, partition_keys
from daemon.settings import ConfigError, Settings, load_settings


def test_partition_keys_unpartitioned() -> None:
    assert partition_keys(Settings()) == [
        PartitionKeys(
            partition=None,
            inputs=("bars",),
            output="predictions",
            dead_letter="bars:dead",
            lease_key="livepred:lease",
        )
    ]


def test_partition_keys_four_partitions() -> None:
    s = load_settings(None, {"LIVEPRED_STREAMS__PARTITIONS": "4"})
    keys = partition_keys(s)
    assert [k.partition for k in keys] == [0, 1, 2, 3]
    assert keys[3] == PartitionKeys(
        partition=3,
        inputs=("bars:{3}",),
        output="predictions:{3}",
        dead_letter="bars:dead:{3}",
        lease_key="livepred:lease:{3}",
    )


def test_partition_keys_owned_subset_and_several_inputs() -> None:
    s = load_settings(
        None,
        {
            "LIVEPRED_STREAMS__PARTITIONS": "8",
            "LIVEPRED_STREAMS__PARTITIONS_OWNED": "6,2",
            "LIVEPRED_STREAMS__INPUT": "bars,quotes",
            "LIVEPRED_STREAMS__GROUP": "lp",
        },
    )
    keys = partition_keys(s)
    assert [k.partition for k in keys] == [2, 6]
    assert keys[0].inputs == ("bars:{2}", "quotes:{2}")
    assert keys[1].lease_key == "lp:lease:{6}"


def test_partition_keys_cluster_single_partition() -> None:
    s = load_settings(None, {"LIVEPRED_REDIS__CLUSTER": "true"})
    assert partition_keys(s) == [
        PartitionKeys(0, ("bars:{0}",), "predictions:{0}", "bars:dead:{0}", "livepred:lease:{0}")
    ]


def test_partition_key_helper() -> None:
    assert partition_key("bars", None) == "bars"
    assert partition_key("bars:dead", 12) == "bars:dead:{12}"


def test_partition_for_symbol_is_crc32() -> None:
    for symbol in ("AAPL", "MSFT", "BRK.B", "€URO", ""):
        for n in (1, 2, 4, 7, 16):
            assert partition_for_symbol(symbol, n) == zlib.crc32(symbol.encode()) % n
    assert partition_for_symbol("AAPL", 1) == 0
    spread = {partition_for_symbol(f"SYM{i}", 4) for i in range(100)}
    assert spread == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        partition_for_symbol("AAPL", 0)


def test_partitions_preferred_must_be_owned_and_marks_the_keys() -> None:
    env = {"LIVEPRED_STREAMS__PARTITIONS": "4", "LIVEPRED_STREAMS__PARTITIONS_PREFERRED": "1,3"}
    keys = partition_keys(load_settings(None, env))
    assert [k.preferred for k in keys] == [False, True, False, True]
    assert keys[3].handback_key == "livepred:handback:{3}"
    assert all(k.preferred for k in partition_keys(load_settings(None, {})))
    bad = {**env, "LIVEPRED_STREAMS__PARTITIONS_OWNED": "0,1"}
    with pytest.raises(ConfigError) as info:
        load_settings(None, bad)
    assert str(info.value).startswith("streams.partitions_preferred:")
    assert "\n" not in str(info.value)
