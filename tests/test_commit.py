"""The atomic write of a batch (`StreamIO.commit`, CONTRACT section 4): every output in
order with its symbol and data, every dead letter with its fields, every entry acked (more
than one XACK's worth included), the output trimmed to about `output_maxlen`, and a batch
committed twice written once. On fakeredis and on the real Redis."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.entries import Commit
from daemon.streams import ALREADY_COMMITTED, COMMITTED, StreamIO

pytestmark = pytest.mark.timeout(60)

TOKEN = "inst-a:1111"
MAXLEN = 1000


async def _io_with_pending(redis: Any, prefix: str, per_input: int) -> tuple[StreamIO, list[Any]]:
    """Two input streams with `per_input` entries each, all read (pending) under the lease."""
    io = StreamIO(
        redis,
        inputs=[f"{prefix}bars:a", f"{prefix}bars:b"],
        output=f"{prefix}predictions",
        dead_letter=f"{prefix}bars:dead",
        group=f"{prefix}livepred",
        consumer="inst-a",
        lease_key=f"{prefix}livepred:lease",
        output_maxlen=MAXLEN,
    )
    await io.ensure_groups()
    for stream in io.inputs:
        pipe = redis.pipeline(transaction=False)
        for i in range(per_input):
            pipe.xadd(stream, {"n": str(i)})
        await pipe.execute()
    await redis.set(io.lease_key, TOKEN, px=30_000)
    entries: list[Any] = []
    while True:
        batch = await io.read_new(TOKEN, 5000, 10)
        assert batch is not None
        if not len(batch):
            return io, entries
        entries.extend(batch)


async def test_a_commit_writes_every_output_and_dead_letter_and_acks_every_entry(
    client_and_prefix: tuple[Any, str],
) -> None:
    redis, prefix = client_and_prefix
    io, entries = await _io_with_pending(redis, prefix, per_input=600)  # 1,200 ids in all
    acks: dict[str, list[str]] = {}
    for e in entries:
        acks.setdefault(e.stream, []).append(e.entry_id)
    outputs = [(f"S{i:04d}".encode(), bytes([i % 256]) * (1 + i % 7)) for i in range(700)]
    dead = [
        {b"error": b"decode_error", b"src_stream": b"bars:a", b"src_id": b"1-0"},
        {b"data": b"\xc1", b"error": b"bad_value:close"},
    ]
    assert await io.commit(TOKEN, Commit(outputs=outputs, dead=dead, acks=acks)) == COMMITTED

    written = await redis.xrange(io.output)
    assert [(f[b"symbol"], f[b"data"]) for _, f in written] == outputs
    assert [f for _, f in await redis.xrange(io.dead_letter)] == dead
    for stream in io.inputs:
        assert (await redis.xpending(stream, io.group))["pending"] == 0
    # The same batch again (a retry after a dropped connection): nothing is written twice.
    again = Commit(outputs=outputs, dead=dead, acks=acks)
    assert await io.commit(TOKEN, again) == ALREADY_COMMITTED
    assert await redis.xlen(io.output) == len(outputs)


async def test_the_output_is_trimmed_to_about_its_maxlen(
    client_and_prefix: tuple[Any, str],
) -> None:
    redis, prefix = client_and_prefix
    io, entries = await _io_with_pending(redis, prefix, per_input=3)
    outputs = [(b"S", str(i).encode()) for i in range(MAXLEN * 3)]
    acks = {io.inputs[0]: [e.entry_id for e in entries if e.stream == io.inputs[0]]}
    assert await io.commit(TOKEN, Commit(outputs=outputs, dead=[], acks=acks)) == COMMITTED
    # `MAXLEN ~`: Redis trims whole nodes (100 entries each by default), never below maxlen.
    length = await redis.xlen(io.output)
    assert MAXLEN <= length <= MAXLEN + 100
    newest = await redis.xrevrange(io.output, count=1)
    assert newest[0][1][b"data"] == str(MAXLEN * 3 - 1).encode()


async def test_input_entries_removed_before_they_were_read_are_told(
    client_and_prefix: tuple[Any, str],
) -> None:
    # A feeder's MAXLEN trims while the daemon is down: the entries it had not read are gone.
    redis, prefix = client_and_prefix
    io = StreamIO(
        redis, inputs=[f"{prefix}bars"], output=f"{prefix}predictions",
        dead_letter=f"{prefix}bars:dead", group=f"{prefix}livepred", consumer="inst-a",
        lease_key=f"{prefix}livepred:lease", output_maxlen=MAXLEN,
    )
    await io.ensure_groups()
    stream = io.inputs[0]
    ids = [(await redis.xadd(stream, {"n": str(i)})).decode() for i in range(6)]
    assert await io.unread_entries_gone() == {}  # nothing read, nothing removed
    await redis.xreadgroup(io.group, "inst-a", {stream: ">"}, count=2)
    await redis.xtrim(stream, maxlen=5, approximate=False)  # a read one, the last read kept
    assert await io.unread_entries_gone() == {}
    await redis.xtrim(stream, maxlen=2, approximate=False)  # ids[2], ids[3]: never read
    gone = await io.unread_entries_gone()
    assert list(gone) == [stream] and ids[1] in gone[stream] and ids[4] in gone[stream]
    await redis.xtrim(stream, maxlen=0, approximate=False)  # everything
    gone = await io.unread_entries_gone()
    assert "trimmed to empty" in gone[stream] and ids[5] in gone[stream]
    # A group that read nothing yet: whatever was removed was unread (Redis 7 counts them).
    await redis.xadd(stream, {"n": "6"})
    await redis.xgroup_destroy(stream, io.group)
    await redis.xgroup_create(stream, io.group, id="0")
    await redis.xtrim(stream, maxlen=0, approximate=False)
    info = await redis.xinfo_stream(stream)
    if "entries-added" in info:
        assert await io.unread_entries_gone() == {stream: "7 entries removed before the first read"}


@pytest.mark.parametrize("broken", ["output", "dead_letter"])
async def test_a_commit_that_cannot_write_everything_writes_nothing(
    client_and_prefix: tuple[Any, str], broken: str
) -> None:
    # A Lua script keeps what it wrote before an error: the outputs of a batch whose dead
    # letter cannot be written would be published again on every retry. The keys are checked
    # before the first write.
    redis, prefix = client_and_prefix
    io, entries = await _io_with_pending(redis, prefix, per_input=2)
    key = io.output if broken == "output" else io.dead_letter
    await redis.set(key, "not a stream")
    acks: dict[str, list[str]] = {}
    for e in entries:
        acks.setdefault(e.stream, []).append(e.entry_id)
    commit = Commit(outputs=[(b"S", b"x")], dead=[{b"error": b"decode_error"}], acks=acks)
    with pytest.raises(Exception, match="WRONGTYPE") as raised:
        await io.commit(TOKEN, commit)
    assert key in str(raised.value)
    other = io.dead_letter if broken == "output" else io.output
    assert await redis.exists(other) == 0  # not one write
    for stream in io.inputs:
        assert (await redis.xpending(stream, io.group))["pending"] == 2  # not one ack


async def test_a_dead_letter_of_an_entry_with_thousands_of_fields_is_written(
    client_and_prefix: tuple[Any, str],
) -> None:
    from daemon.wire import MAX_DEAD_LETTER_FIELDS, dead_letter_fields, decode_bar

    redis, prefix = client_and_prefix
    io, entries = await _io_with_pending(redis, prefix, per_input=1)
    wide = {f"k{i}".encode(): b"v" for i in range(5000)}  # flat fields, no `high`
    rejection = decode_bar(wide, "bars:a", "1-0")
    fields = dead_letter_fields(rejection)  # type: ignore[arg-type]
    assert fields[b"fields_total"] == b"5000"
    assert fields[b"k0"] == b"v" and len(fields) == MAX_DEAD_LETTER_FIELDS + 4
    acks: dict[str, list[str]] = {}
    for e in entries:
        acks.setdefault(e.stream, []).append(e.entry_id)
    commit = Commit(outputs=[(b"S", b"x")], dead=[fields], acks=acks)
    assert await io.commit(TOKEN, commit) == COMMITTED
    (_, written), = await redis.xrange(io.dead_letter)
    assert written[b"error"] == b"missing_field:symbol" and written[b"fields_total"] == b"5000"
