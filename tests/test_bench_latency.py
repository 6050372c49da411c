"""The benchmark's latencies: XADD sent to output seen, and their split by Redis's clock."""

from __future__ import annotations

import math

import numpy as np

from daemon.bench_latency import latencies_ms, server_split_ms
from daemon.bench_limit import split_percentiles


def test_each_bar_is_split_at_its_output_entry() -> None:
    sent = ["1000-0", "1000-1", "1002-0", "1005-7"]
    # Outputs seen in another order than fed; "1002-0" never got one.
    seen_ids = ["1005-7", "1000-0", "1000-1"]
    out_ids = ["1009-0", "1003-2", "1003-3"]
    seen_us = [1_012_250, 1_004_500, 1_003_900]
    inside, reader = server_split_ms(sent, seen_ids, out_ids, seen_us)
    assert inside[0] == 3 and inside[1] == 3 and inside[3] == 4
    assert reader[0] == 1.5 and math.isclose(reader[1], 0.9) and reader[3] == 3.25
    assert math.isnan(inside[2]) and math.isnan(reader[2])


def test_percentiles_leave_out_the_warm_up_and_the_bars_without_output() -> None:
    n = 100
    sent = [f"{1000 + k}-0" for k in range(n)]
    # The first 10 bars (the warm-up) waited 500 ms; the rest k % 5 ms, seen 1 ms later.
    waits = [500 if k < 10 else k % 5 for k in range(n)]
    out_ids = [f"{1000 + k + w}-0" for k, w in enumerate(waits)]
    seen_us = [(1000 + k + w + 1) * 1000 for k, w in enumerate(waits)]
    keep = [k for k in range(n) if k != 50]  # one bar lost
    got = split_percentiles(
        {"ids": sent},
        {
            "ids": [sent[k] for k in keep],
            "out_ids": [out_ids[k] for k in keep],
            "seen_us": [seen_us[k] for k in keep],
        },
    )
    expected = np.array([waits[k] for k in range(10, n) if k != 50], dtype=float)
    assert got["inside_p50_ms"] == np.percentile(expected, 50)
    assert got["inside_p99_ms"] == np.percentile(expected, 99)
    assert got["reader_p50_ms"] == 1.0 and got["reader_p99_ms"] == 1.0


def test_latency_is_seen_minus_sent_per_fed_bar_in_feed_order() -> None:
    sent_ids = ["5-0", "5-1", "6-0"]
    sent_us = [5_000_100, 5_000_300, 6_000_000]
    # seen out of order; "5-1" never seen
    lat, missing = latencies_ms(sent_ids, sent_us, ["6-0", "5-0"], [6_002_500, 5_001_350])
    assert missing == 1
    assert lat[0] == 1.25 and math.isnan(lat[1]) and lat[2] == 2.5
