"""The overlapped serving loop alone: reads, computes and writes of fake steps, each held at a
gate the test opens, so every interleaving asserted here is forced, not hoped for."""

from __future__ import annotations

import asyncio

import pytest

from daemon.batch import BatchReport
from daemon.entries import Commit, EntryBatch
from daemon.overlap import Steps, serve_overlapped

PER_READ = 2


class FakeSteps:
    """A stream of entry ids read `PER_READ` at a time; computes and writes that wait for the
    test to open their gate (per batch, in order) when `hold_*` is set."""

    def __init__(self) -> None:
        self.waiting: list[str] = []
        self.arrived = asyncio.Event()
        self.read_error: Exception | None = None
        self.publish_error: Exception | None = None
        self.reads = 0
        self.stopping = False
        self.flush = False
        self.hold_compute = False
        self.hold_publish = False
        self.compute_gates: list[asyncio.Event] = []
        self.publish_gates: list[asyncio.Event] = []
        self.computed: list[list[str]] = []  # batches as computed, when their compute ended
        self.compute_started: list[list[str]] = []
        self.publishing = 0
        self.most_publishing = 0
        self.published: list[list[str]] = []
        self.publish_started: list[list[str]] = []
        self.events: list[str] = []

    def add(self, *ids: str) -> None:
        self.waiting += ids
        self.arrived.set()

    async def read(self) -> tuple[EntryBatch, int]:
        self.reads += 1
        if not self.waiting and self.read_error is None:
            self.arrived.clear()
            try:  # a blocking read that comes back empty after its block time
                await asyncio.wait_for(self.arrived.wait(), 0.02)
            except TimeoutError:
                pass
        if self.read_error is not None:
            raise self.read_error
        got, self.waiting = self.waiting[:PER_READ], self.waiting[PER_READ:]
        return EntryBatch(["bars"] * len(got), got, [[] for _ in got]), self.reads

    async def compute(self, batch: EntryBatch, read_at: int) -> tuple[Commit, BatchReport]:
        ids = list(batch.ids)
        self.compute_started.append(ids)
        self.events.append(f"compute {ids[0]}")
        if self.hold_compute:
            gate = asyncio.Event()
            self.compute_gates.append(gate)
            await gate.wait()
        self.computed.append(ids)
        return Commit([], [], {"bars": ids}), BatchReport(bars=len(ids))

    async def publish(self, commit: Commit, report: BatchReport, read_at: int) -> None:
        ids = commit.acks["bars"]
        self.publish_started.append(ids)
        self.events.append(f"publish {ids[0]}")
        self.publishing += 1
        self.most_publishing = max(self.most_publishing, self.publishing)
        try:
            if self.publish_error is not None:
                await asyncio.sleep(0.001)
                raise self.publish_error
            if self.hold_publish:
                gate = asyncio.Event()
                self.publish_gates.append(gate)
                await gate.wait()
            else:
                await asyncio.sleep(0.001)
            self.published.append(ids)
            self.events.append(f"published {ids[0]}")
        finally:
            self.publishing -= 1

    def steps(self) -> Steps:
        return Steps(
            read=self.read,
            compute=self.compute,
            publish=self.publish,
            may_read=lambda: not self.stopping,
            check=lambda: None,
            progressed=lambda: None,
            flush_first=lambda: self.flush,
        )


async def _until(condition, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 5.0
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def _flat(batches: list[list[str]]) -> list[str]:
    return [i for b in batches for i in b]


async def test_every_entry_is_written_once_in_read_order_one_write_at_a_time() -> None:
    fake = FakeSteps()
    ids = [str(i) for i in range(41)]
    serving = asyncio.create_task(serve_overlapped(fake.steps(), per_read=PER_READ, max_reads=3))
    for i in range(0, len(ids), 3):  # arriving while batches compute and write
        fake.add(*ids[i : i + 3])
        await asyncio.sleep(0.002)
    await _until(lambda: len(_flat(fake.published)) == len(ids), "every entry written")
    fake.stopping = True
    await asyncio.wait_for(serving, 5)
    assert _flat(fake.published) == ids
    assert fake.published == fake.computed  # each batch written as computed, in order
    assert fake.most_publishing == 1
    assert max(map(len, fake.computed)) <= PER_READ * 3


async def test_full_reads_made_while_a_batch_computes_join_the_next_batch_up_to_the_cap() -> None:
    fake = FakeSteps()
    fake.hold_compute = True
    fake.add(*[str(i) for i in range(20)])
    serving = asyncio.create_task(serve_overlapped(fake.steps(), per_read=PER_READ, max_reads=3))
    await _until(lambda: len(fake.compute_gates) == 1, "the first compute")
    await asyncio.sleep(0.05)  # every read the loop would make meanwhile
    # The first read (2) computes; full reads go on until 3 reads (6 entries) wait, no more.
    assert fake.reads == 4
    fake.compute_gates[0].set()
    await _until(lambda: len(fake.compute_gates) == 2, "the second compute")
    assert fake.compute_started[1] == [str(i) for i in range(2, 8)]
    fake.hold_compute = False
    for gate in fake.compute_gates:
        gate.set()
    await _until(lambda: len(_flat(fake.published)) == 20, "every entry written")
    fake.stopping = True
    await asyncio.wait_for(serving, 5)
    assert _flat(fake.published) == [str(i) for i in range(20)]


async def test_a_short_read_is_not_followed_by_another_until_the_batch_is_computed() -> None:
    fake = FakeSteps()
    fake.hold_compute = True
    fake.add("0", "1", "2")
    serving = asyncio.create_task(serve_overlapped(fake.steps(), per_read=PER_READ))
    await _until(lambda: len(fake.compute_gates) == 1, "the first compute")
    await _until(lambda: fake.reads == 2, "the read made while computing")
    fake.add("3")  # arrives while the batch computes: waits for it, not read at once
    await asyncio.sleep(0.06)  # three block times: a loop reading on would have read again
    assert fake.reads == 2
    fake.hold_compute = False
    fake.compute_gates[0].set()
    await _until(lambda: len(_flat(fake.published)) == 4, "every entry written")
    fake.stopping = True
    await asyncio.wait_for(serving, 5)
    assert fake.computed == [["0", "1"], ["2"], ["3"]]


async def test_a_failed_read_leaves_the_batch_in_hand_unwritten_but_finished_and_the_write_in_flight_lands() -> None:  # noqa: E501
    fake = FakeSteps()
    fake.hold_publish = True
    fake.add("0", "1")
    serving = asyncio.create_task(serve_overlapped(fake.steps(), per_read=PER_READ))
    await _until(lambda: len(fake.publish_gates) == 1, "the first write in flight")
    fake.hold_compute = True
    fake.add("2", "3")
    await _until(lambda: len(fake.compute_gates) == 1, "the second batch computing")
    fake.read_error = ConnectionError("lease lost")
    fake.arrived.set()
    await asyncio.sleep(0.05)
    assert not serving.done()  # waits for the compute in hand: never left running alone
    fake.compute_gates[0].set()
    await asyncio.sleep(0.05)
    assert not serving.done()  # and for the write in flight
    assert fake.published == []
    fake.publish_gates[0].set()
    with pytest.raises(ConnectionError, match="lease lost"):
        await asyncio.wait_for(serving, 5)
    assert fake.computed == [["0", "1"], ["2", "3"]]  # the second compute ran to its end
    assert fake.published == [["0", "1"]]  # the write in flight landed, the batch in hand not
    assert fake.publish_started == [["0", "1"]]


async def test_a_failed_write_is_raised_while_no_bar_arrives() -> None:
    # The last batch of a burst: its write fails (Redis OOM) and nothing else is read. The
    # loop must not wait for another bar to find out.
    fake = FakeSteps()
    fake.publish_error = ConnectionError("OOM command not allowed")
    fake.add("0", "1")
    serving = asyncio.create_task(serve_overlapped(fake.steps(), per_read=PER_READ))
    with pytest.raises(ConnectionError, match="OOM"):
        await asyncio.wait_for(serving, 1.0)
    assert fake.published == []
    assert fake.reads >= 2  # it was waiting on an empty read when the write failed


@pytest.mark.parametrize("flush", [False, True])
async def test_when_asked_the_write_in_flight_lands_before_the_next_batch_computes(
    flush: bool,
) -> None:
    fake = FakeSteps()
    fake.flush = flush
    fake.hold_publish = True
    fake.add("0", "1")
    serving = asyncio.create_task(serve_overlapped(fake.steps(), per_read=PER_READ))
    await _until(lambda: len(fake.publish_gates) == 1, "the first write in flight")
    fake.add("2", "3")
    await asyncio.sleep(0.03)
    # Without the flush the next batch computes beside the write; with it, it waits.
    assert fake.compute_started == ([["0", "1"]] if flush else [["0", "1"], ["2", "3"]])
    fake.hold_publish = False
    fake.publish_gates[0].set()
    await _until(lambda: len(_flat(fake.published)) == 4, "every entry written")
    fake.stopping = True
    await asyncio.wait_for(serving, 5)
    expected_order = ["compute 0", "publish 0", "published 0", "compute 2", "publish 2"]
    if not flush:
        expected_order = ["compute 0", "publish 0", "compute 2", "published 0", "publish 2"]
    assert fake.events[:5] == expected_order


async def test_stopping_writes_what_was_read_then_returns() -> None:
    fake = FakeSteps()
    fake.hold_compute = True
    fake.add("0", "1", "2", "3")
    serving = asyncio.create_task(serve_overlapped(fake.steps(), per_read=PER_READ))
    await _until(lambda: len(fake.compute_gates) == 1, "the first compute")
    await _until(lambda: fake.reads >= 2, "a read while computing")
    fake.stopping = True
    fake.hold_compute = False
    fake.compute_gates[0].set()
    await asyncio.wait_for(serving, 5)
    # Everything read before the stop is computed and written; nothing is read after it.
    assert fake.published == fake.computed == [["0", "1"], ["2", "3"]]
    assert fake.reads <= 3
