"""The partition lease (daemon/lease.py), on fakeredis and the real Redis: taking it, a
stand-in's patience, renewal, loss, and hand-back requests."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from daemon.lease import LeaseLost, PartitionLease
from daemon.observe import Metrics
from daemon.partitions import partition_keys
from daemon.settings import prefixed_settings
from daemon.streams import StreamIO

LEASE_MS = 300


def _io(redis: Any, prefix: str, consumer: str) -> StreamIO:
    """Partition 1 of 2, keyed as the service keys it (`<prefix>livepred:lease:{1}`, ...)."""
    settings = prefixed_settings("redis://unused", "unused", prefix, consumer, partitions="2")
    keys = partition_keys(settings)[1]
    return StreamIO.for_partition(redis, keys, group=settings.streams.group, consumer=consumer,
                                  output_maxlen=1000)


def _lease(redis: Any, prefix: str, name: str, *, preferred: bool = True) -> PartitionLease:
    return PartitionLease(
        _io(redis, prefix, name), partition=1, token=f"{name}:token", lease_ms=LEASE_MS,
        metrics=Metrics(), preferred=preferred,
    )


def _count(lease: PartitionLease, counter: str) -> float:
    return float(getattr(lease.metrics, counter).labels("1")._value.get())


async def test_one_holder_at_a_time(client_and_prefix: tuple[Any, str]) -> None:
    redis, prefix = client_and_prefix
    a, b = _lease(redis, prefix, "a"), _lease(redis, prefix, "b")
    assert await a.try_take() is True
    await a.io.ensure_groups()  # as a holder does first
    assert a.io.lease_key == f"{prefix}livepred:lease:{{1}}"
    assert await redis.get(a.io.lease_key) == b"a:token"
    assert await a.io.handback_requested() is False
    assert await b.try_take() is False  # held by a; b (preferred) asks for it back instead
    assert await a.io.handback_requested() is True
    assert await redis.get(a.io.handback_key) == b"b:token"
    assert _count(a, "failovers") == 1 and _count(b, "failovers") == 0
    await a.release()
    assert await redis.get(a.io.lease_key) is None
    assert await b.try_take() is True


async def test_a_stand_in_waits_for_the_lease_to_stay_free_a_whole_lease_time(
    client_and_prefix: tuple[Any, str],
) -> None:
    redis, prefix = client_and_prefix
    stand_in = _lease(redis, prefix, "s", preferred=False)
    assert await stand_in.try_take() is False  # free, but only just seen free
    await asyncio.sleep(LEASE_MS / 2000)
    assert await stand_in.try_take() is False
    await redis.set(stand_in.io.lease_key, "other", px=LEASE_MS)
    assert await stand_in.try_take() is False  # someone took it: the wait starts over
    await redis.delete(stand_in.io.lease_key)
    assert await stand_in.try_take() is False
    await asyncio.sleep(LEASE_MS / 1000 + 0.05)
    assert await stand_in.try_take() is True
    # A stand-in never asks anyone to hand a partition back.
    assert await redis.exists(stand_in.io.handback_key) == 0


async def test_renewal_keeps_the_lease_past_its_time_until_done(
    client_and_prefix: tuple[Any, str],
) -> None:
    redis, prefix = client_and_prefix
    a = _lease(redis, prefix, "a")
    assert await a.try_take()
    done = asyncio.Event()
    renewer = asyncio.create_task(a.keep_renewed(done))
    await asyncio.sleep(3 * LEASE_MS / 1000)
    assert await redis.get(a.io.lease_key) == b"a:token"
    assert not a.lost.is_set()
    assert _count(a, "lease_renewals") >= 3
    done.set()
    await asyncio.wait_for(renewer, timeout=1)
    await asyncio.sleep(LEASE_MS / 1000 + 0.1)
    assert await redis.get(a.io.lease_key) is None  # no longer renewed: it expired


async def test_a_lease_taken_by_another_is_lost(client_and_prefix: tuple[Any, str]) -> None:
    redis, prefix = client_and_prefix
    a = _lease(redis, prefix, "a")
    assert await a.try_take()
    a.check()  # held: no error
    done = asyncio.Event()
    renewer = asyncio.create_task(a.keep_renewed(done))
    await redis.set(a.io.lease_key, "b:token", px=10 * LEASE_MS)  # expired and taken over
    await asyncio.wait_for(renewer, timeout=2)  # the renewer ends on its own
    assert a.lost.is_set()
    with pytest.raises(LeaseLost):
        a.check()
    assert await redis.get(a.io.lease_key) == b"b:token"  # the new holder's, untouched


async def test_a_lease_key_lost_by_redis_while_held_is_taken_again(
    client_and_prefix: tuple[Any, str],
) -> None:
    # Redis restarted without its data: the key is gone while our lease had time left, so
    # no one can have taken it over by expiry: the renewer takes it again, nothing is lost.
    redis, prefix = client_and_prefix
    a = _lease(redis, prefix, "a")
    await a.io.ensure_groups()
    assert await a.try_take()
    done = asyncio.Event()
    renewer = asyncio.create_task(a.keep_renewed(done))
    await redis.delete(a.io.lease_key)
    await asyncio.sleep(2 * LEASE_MS / 1000)
    assert not a.lost.is_set() and not renewer.done()
    assert await redis.get(a.io.lease_key) == b"a:token"
    done.set()
    await asyncio.wait_for(renewer, timeout=1)
    # Held by another instance, or gone after our lease could have expired: not ours.
    await redis.set(a.io.lease_key, "b:token", px=10 * LEASE_MS)
    assert await a.reclaim() is False
    await redis.delete(a.io.lease_key)
    await asyncio.sleep(LEASE_MS / 1000 + 0.05)  # no renewal meanwhile: it may have expired
    assert await a.reclaim() is False  # and the group is there: another may have served
    assert await redis.get(a.io.lease_key) is None
    # The group gone too does not prove that no one served meanwhile (a failover before
    # Redis lost its data wipes the new holder's group as well): not ours either.
    await redis.delete(*a.io.inputs)
    assert await a.reclaim() is False
    assert await redis.get(a.io.lease_key) is None


async def test_after_redis_lost_its_data_the_holder_gets_its_lease_back_first(
    client_and_prefix: tuple[Any, str],
) -> None:
    # Redis restarted empty under a live holder: the lease key and the group are gone. A
    # preferred standby that saw the lease held waits a lease time before taking it, so the
    # holder, whose lease had time left, takes it back and keeps its state.
    redis, prefix = client_and_prefix
    holder, standby = _lease(redis, prefix, "h"), _lease(redis, prefix, "s")
    assert await holder.try_take() is True
    await holder.io.ensure_groups()
    assert await standby.try_take() is False  # held: seen, asks for it back
    await redis.delete(holder.io.lease_key, *holder.io.inputs, holder.io.handback_key)
    assert await standby.try_take() is False  # free, but vanished with its group: waits
    assert await holder.reclaim() is True
    assert await standby.try_take() is False
    assert await redis.get(holder.io.lease_key) == b"h:token"
    # Had the holder not come back, the standby takes it after a whole lease time free.
    await redis.delete(holder.io.lease_key)
    assert await standby.try_take() is False
    await asyncio.sleep(LEASE_MS / 1000 + 0.05)
    assert await standby.try_take() is True


async def test_after_losing_its_lease_an_instance_lets_the_new_holder_reclaim_first(
    client_and_prefix: tuple[Any, str],
) -> None:
    # A stalled past its lease, B took over; then Redis lost its data. A must not grab the
    # free key at once (with state older than B's): B may take it back within its lease.
    redis, prefix = client_and_prefix
    a = _lease(redis, prefix, "a")
    assert await a.try_take() is True
    await a.io.ensure_groups()
    a.refused()  # a fenced read told A the lease is someone else's
    await redis.delete(a.io.lease_key, *a.io.inputs)
    assert await a.try_take() is False
    await asyncio.sleep(LEASE_MS / 1000 + 0.05)
    assert await a.try_take() is True  # no one came back for it in a lease time


async def test_a_refused_write_marks_the_lease_lost(fake_redis: Any) -> None:
    a = _lease(fake_redis, "t:", "a")
    assert await a.try_take()
    error = a.refused()
    assert isinstance(error, LeaseLost) and a.lost.is_set()
    with pytest.raises(LeaseLost):
        a.check()


async def test_a_stand_in_learns_of_a_handback_request_while_renewing(
    client_and_prefix: tuple[Any, str],
) -> None:
    redis, prefix = client_and_prefix
    stand_in = _lease(redis, prefix, "s", preferred=False)
    preferred = _lease(redis, prefix, "p")
    assert await stand_in.try_take() is False
    await asyncio.sleep(LEASE_MS / 1000 + 0.05)
    assert await stand_in.try_take() is True
    await stand_in.io.ensure_groups()  # as a holder does first
    done = asyncio.Event()
    renewer = asyncio.create_task(stand_in.keep_renewed(done))
    assert await preferred.try_take() is False  # asks for it back
    await asyncio.wait_for(stand_in.handback.wait(), timeout=2)
    assert not stand_in.lost.is_set()  # asked, not lost: the stand-in hands it back itself
    done.set()
    await asyncio.wait_for(renewer, timeout=1)
    await stand_in.release()
    assert await preferred.try_take() is True
