"""What sending a chunk's messages to the decode helper costs: through its pipe, or a memfd.

Why: the decode helper (`stream_agg/kafka/decode_pool.py`) is the stage the fold waits for
while the worker catches up, and both cores are busy then, so the CPU that moving ~400 MB
of messages costs is CPU the decode and the fold do not get. This sends the same chunks
(16 MB: 80 messages of 200 KB over 4 partitions, like the worker's `FOLD_BYTES` chunks)
to one spawned helper both ways, alternating, and prints the worker's and the helper's CPU
seconds (user + system, from getrusage) per round and their medians. The helper only reads
the messages back (`read_shared`, or unpickling for the pipe), so the figures are the
transfer's alone.

    python bench/shared_input.py [--chunks 25] [--rounds 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import resource
import statistics
import time

from stream_agg.kafka.decode_pool import Batch, SharedBatch, read_shared, share_batch


def _size(batch: Batch) -> int:
    return sum(len(v or b"") for _, msgs in batch for _, v in msgs)


def through_pipe(batch: Batch) -> int:
    return _size(batch)


def through_memfd(shared: SharedBatch) -> int:
    batch = read_shared(shared)
    if isinstance(batch, str):
        raise RuntimeError(batch)
    return _size(batch)


def _helper_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(mode: str, chunks: int, batch: Batch) -> tuple[float, float, float]:
    """(wall, worker CPU, helper CPU) seconds to send `chunks` chunks, two in flight."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        pool.submit(through_pipe, []).result()  # started
        helper0 = pool.submit(_helper_cpu).result()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        began = time.perf_counter()
        pending: list[tuple[concurrent.futures.Future[int], int | None]] = []
        for _ in range(chunks):
            if mode == "pipe":
                pending.append((pool.submit(through_pipe, batch), None))
            else:
                shared = share_batch(batch)
                pending.append((pool.submit(through_memfd, shared), shared.fd))
            while len(pending) > 2:
                fut, fd = pending.pop(0)
                assert fut.result() == _size(batch)
                if fd is not None:
                    os.close(fd)
        for fut, fd in pending:
            assert fut.result() == _size(batch)
            if fd is not None:
                os.close(fd)
        wall = time.perf_counter() - began
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        helper = pool.submit(_helper_cpu).result() - helper0
    worker = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return wall, worker, helper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=25, help="16 MB chunks per round (25 = 400 MB)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    batch: Batch = [(p, [(i, os.urandom(200_000)) for i in range(20)]) for p in range(4)]
    mb = args.chunks * _size(batch) / 1e6
    results: dict[str, list[tuple[float, float, float]]] = {"pipe": [], "memfd": []}
    for r in range(args.rounds):
        for mode in ("pipe", "memfd") if r % 2 == 0 else ("memfd", "pipe"):
            wall, worker, helper = run(mode, args.chunks, batch)
            results[mode].append((wall, worker, helper))
            print(f"round {r + 1} {mode:5s}: {mb:,.0f} MB in {wall:.3f} s wall, worker CPU {worker:.3f} s, "
                  f"helper CPU {helper:.3f} s", flush=True)
    for mode, rs in results.items():
        print(f"median {mode:5s}: wall {statistics.median(x[0] for x in rs):.3f} s, worker CPU "
              f"{statistics.median(x[1] for x in rs):.3f} s, helper CPU {statistics.median(x[2] for x in rs):.3f} s")


if __name__ == "__main__":
    main()
