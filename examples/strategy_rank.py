"""A minimal strategy: rank symbols by the routed prediction (`pred`) each bar.

    python examples/strategy_rank.py --redis-url redis://127.0.0.1:6379/0 --target fwd_ret_5

It reads every output partition with `daemon.client.PredictionReader`. Predictions of one bar
time arrive symbol by symbol; when the first prediction of a newer bar arrives, the previous
bar's cross-section is complete enough to rank: the top and bottom N symbols are printed.
(A production strategy would also wait for the symbols it expects, or a deadline.)
With `--group`, the strategy reads as a consumer group: a restart resumes where it stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import redis.asyncio as aioredis

from daemon.client import PredictionEvent, PredictionReader


def rank(ts: int, preds: dict[str, float], top: int) -> str:
    ordered = sorted(preds.items(), key=lambda kv: kv[1], reverse=True)
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts / 1000))

    def show(items: list[tuple[str, float]]) -> str:
        return ", ".join(f"{symbol} {value * 1e4:+.1f}bp" for symbol, value in items)

    return (
        f"{stamp}  {len(ordered):>4} symbols  long: {show(ordered[:top])}"
        f"  |  short: {show(ordered[::-1][:top])}"
    )


async def run(args: argparse.Namespace) -> int:
    client = aioredis.Redis.from_url(args.redis_url)
    group_args = {"group": args.group, "consumer": args.consumer} if args.group else {}
    reader = PredictionReader(
        client,
        stream=args.stream,
        partitions=args.partitions,
        cluster=args.cluster,
        start=args.start,
        **group_args,
    )
    current_ts: int | None = None
    book: dict[str, float] = {}
    wait_s = 0.5
    try:
        while True:
            try:
                async for event in reader:
                    wait_s = 0.5
                    value = pick(event, args.target)
                    if value is None:
                        continue  # the selected family is still warming for this symbol
                    if current_ts is not None and event.ts > current_ts:
                        print(rank(current_ts, book, args.top), flush=True)
                        book = {}
                    if current_ts is None or event.ts >= current_ts:
                        current_ts = event.ts
                        book[event.symbol] = value
            except (aioredis.ConnectionError, aioredis.TimeoutError) as exc:
                # Redis restarting: the reader keeps its position; try again, backing off.
                print(f"redis unavailable ({exc}); retrying in {wait_s:.1f} s",
                      file=sys.stderr, flush=True)
                await asyncio.sleep(wait_s)
                wait_s = min(wait_s * 2, 5.0)
    finally:
        await client.aclose()


def pick(event: PredictionEvent, target: str | None) -> float | None:
    if target is None:
        result = next(iter(event.targets.values()), None)
    else:
        result = event.targets.get(target)
    return None if result is None else result.pred


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--stream", default="predictions", help="streams.output")
    parser.add_argument("--partitions", type=int, default=1, help="streams.partitions")
    parser.add_argument("--cluster", action="store_true", help="redis.cluster = true")
    parser.add_argument("--target", default=None, help="target to rank on (default: the first)")
    parser.add_argument("--top", type=int, default=5, help="symbols shown per side")
    parser.add_argument(
        "--start",
        default="$",
        choices=["$", "0"],
        help="$ = new predictions only, 0 = the whole retained stream",
    )
    parser.add_argument("--group", default=None, help="read as this consumer group")
    parser.add_argument("--consumer", default="strategy-1", help="consumer name in --group")
    try:
        return asyncio.run(run(parser.parse_args()))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
