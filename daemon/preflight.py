"""`livepred run --check`'s look at Redis before a deploy: the server answers, takes the
configured credentials, and every key this instance would use is a stream or absent (a key of
another type fails every read or write of the daemon). Reads only; creates nothing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from daemon.entries import as_str
from daemon.partitions import partition_key, partition_keys
from daemon.redis_faults import UNAVAILABLE, refuses_the_config
from daemon.settings import Settings, redact_url
from daemon.streams import group_lag

TIMEOUT_S = 5.0


@dataclass
class RedisCheck:
    lines: list[str] = field(default_factory=list)  # what was found, one line each
    problems: list[str] = field(default_factory=list)  # each a reason the daemon would fail
    unreachable: str | None = None  # set when Redis did not answer (the daemon would retry)


async def check_redis(redis: Any, settings: Settings) -> RedisCheck:
    """Look at the server and at this instance's keys (its owned partitions)."""
    url = redact_url(settings.redis.url)
    report = RedisCheck()
    try:  # the daemon's own first question (`run` stops on a refusal of it, see service)
        await asyncio.wait_for(redis.ping(), timeout=TIMEOUT_S)
    except UNAVAILABLE as exc:
        if refuses_the_config(exc):  # a password, an ACL, a database index
            report.problems.append(f"redis.url = {url!r}: Redis refused it: {exc}")
        else:  # down, or a passing state (BUSY, LOADING, MASTERDOWN): retried by `run`
            said = str(exc) or type(exc).__name__
            report.unreachable = f"redis.url = {url!r}: no answer: {said}"
        return report
    try:  # the version only: a user without INFO is a valid least-privilege deploy
        info = await asyncio.wait_for(redis.info("server"), timeout=TIMEOUT_S)
    except UNAVAILABLE:
        info = {}
    report.lines.append(f"redis   {url}: Redis {_version(info)}")
    policy = await evicting_policy(redis)
    if policy is not None:
        report.lines.append("warning: " + EVICTION_WARNING.format(policy=policy))
    odd = await unread_inputs(redis, settings)
    if odd:
        report.lines.append("warning: " + UNREAD_WARNING.format(
            keys=", ".join(odd), n=settings.streams.partitions))
    group = settings.streams.group
    try:
        for keys in partition_keys(settings):
            for key in keys.inputs:
                await _input(redis, key, group, report)
            for key, role in ((keys.output, "streams.output"),
                              (keys.dead_letter, "streams.dead_letter")):
                await _stream(redis, key, role, report)
            await _lease(redis, keys.lease_key, report)
    except UNAVAILABLE as exc:
        report.problems.append(f"redis.url = {url!r}: a read failed: {exc}")
    return report


async def evicting_policy(redis: Any) -> str | None:
    """Redis's maxmemory-policy when it evicts keys (streams, groups, the lease can vanish
    under memory pressure), else None; None too when INFO cannot be read."""
    try:
        info = await asyncio.wait_for(redis.info("memory"), timeout=TIMEOUT_S)
    except Exception:  # INFO renamed away, not granted, or a client without it
        return None
    policies = {str(node.get("maxmemory_policy", "noeviction")) for node in _nodes(info)}
    evicting = sorted(policies - {"", "noeviction"})
    return "/".join(evicting) or None


async def unread_inputs(redis: Any, settings: Settings) -> list[str]:
    """Input stream keys that hold entries but that no instance with these settings reads: a
    feeder on another partition layout (`bars` while the daemon reads `bars:{p}`, or a
    partition past `streams.partitions`). Its bars would wait for ever, unseen."""
    n = settings.streams.partitions if settings.partitioned else 0
    odd: list[str] = []
    for name in settings.streams.input:
        candidates = [partition_key(name, 0)] if n == 0 else [name, partition_key(name, n)]
        if settings.redis.cluster:
            candidates = [k for k in candidates if k != name]  # no unsuffixed key on a cluster
        for key in candidates:
            try:
                if await asyncio.wait_for(_type(redis, key), timeout=TIMEOUT_S) == "stream" \
                        and await asyncio.wait_for(redis.xlen(key), timeout=TIMEOUT_S) > 0:
                    odd.append(key)
            except Exception:  # TYPE or XLEN not granted, a cluster slot moving: not known
                continue
    return odd


UNREAD_WARNING = (
    "input stream {keys} holds entries no instance with this config reads (streams.partitions"
    " = {n}): a feeder on another partition layout? Its bars get no prediction; feeders send"
    " a symbol to <input>:{{crc32(symbol) % partitions}} (daemon.client does)"
)


EVICTION_WARNING = (
    "Redis evicts keys under memory pressure (maxmemory-policy = {policy}): input entries, the"
    " consumer group or the lease can vanish; set maxmemory-policy noeviction (writes are then"
    " refused and retried, nothing is lost)"
)


def _nodes(info: Any) -> list[dict[str, Any]]:
    """An INFO reply as one dict per server: a cluster client answers with one per node."""
    if not isinstance(info, dict):
        return []
    nodes = [v for v in info.values() if isinstance(v, dict)]
    return nodes if nodes and len(nodes) == len(info) else [info]


def _version(info: Any) -> str:
    versions = sorted({str(node["redis_version"]) for node in _nodes(info)
                       if "redis_version" in node})
    return "/".join(versions) or "?"


async def _type(redis: Any, key: str) -> str:
    return as_str(await asyncio.wait_for(redis.type(key), timeout=TIMEOUT_S))


async def _stream(redis: Any, key: str, role: str, report: RedisCheck) -> bool:
    kind = await _type(redis, key)
    if kind == "none":
        report.lines.append(f"stream  {key} ({role}): absent, created on the first write")
        return False
    if kind != "stream":
        report.problems.append(
            f"{role}: key {key!r} holds a Redis {kind}, not a stream: every read or write of it"
            " fails (delete the key, or configure another name)"
        )
        return False
    length = await asyncio.wait_for(redis.xlen(key), timeout=TIMEOUT_S)
    report.lines.append(f"stream  {key} ({role}): {length:,} entries")
    return True


async def _input(redis: Any, key: str, group: str, report: RedisCheck) -> None:
    if not await _stream(redis, key, "streams.input", report):
        return
    found = await asyncio.wait_for(group_lag(redis, key, group), timeout=TIMEOUT_S)
    if found is not None:
        g, lag = found
        report.lines.append(
            f"group   {key} {group}: {g.get('pending', 0):,} pending, "
            f"{g.get('consumers', 0)} consumers"
            + ("" if lag is None else f", {lag:,} entries not yet read")
        )
        return
    report.lines.append(
        f"group   {key} {group}: absent, created at start at the stream's end"
        " (the entries already there only warm the state up)"
    )


async def _lease(redis: Any, key: str, report: RedisCheck) -> None:
    holder = await asyncio.wait_for(redis.get(key), timeout=TIMEOUT_S)
    if holder is None:
        report.lines.append(f"lease   {key}: free")
        return
    try:
        ttl_ms = await asyncio.wait_for(redis.pttl(key), timeout=TIMEOUT_S)
    except ResponseError:  # PTTL not granted to this user: the daemon does not need it
        ttl_ms = None
    expires = f", expires in {ttl_ms / 1000:.1f} s" if ttl_ms and ttl_ms > 0 else ""
    report.lines.append(
        f"lease   {key}: held by {as_str(holder)!r}{expires}"
        " (this instance would stand by until it is free)"
    )
