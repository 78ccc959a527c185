#!/usr/bin/env python3
"""O_DIRECT 4 KiB random reads of a file: the kernel ground-truth workload.

Creates the file if needed (--create), then waits --delay seconds (time for a tracer to attach),
then does --count reads of 4 KiB at random aligned offsets with O_DIRECT (every read reaches the
disk), timing each one itself. Writes its own measurements as JSON to --report, then lingers
--linger seconds so that a tracer attached by PID can be stopped by the test.
"""
import argparse
import json
import mmap
import os
import random
import time
from publish import publish  # noqa: E402

BLOCK = 4096



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", required=True)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--count", type=int, default=6000)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--linger", type=float, default=0.0)
    ap.add_argument("--report", required=True)
    ap.add_argument("--create", action="store_true")
    args = ap.parse_args()

    size = args.size_mib * 1024 * 1024
    if args.create:
        if not os.path.exists(args.file) or os.path.getsize(args.file) != size:
            with open(args.file, "wb") as f:
                for _ in range(args.size_mib):
                    f.write(os.urandom(1024 * 1024))
                f.flush()
                os.fsync(f.fileno())
        return

    time.sleep(args.delay)
    blocks = size // BLOCK
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT requires
    fd = os.open(args.file, os.O_RDONLY | os.O_DIRECT)
    rng = random.Random(42)
    lat = []
    nbytes = 0
    for _ in range(args.count):
        off = rng.randrange(blocks) * BLOCK
        t0 = time.perf_counter_ns()
        n = os.preadv(fd, [buf], off)
        lat.append(time.perf_counter_ns() - t0)
        nbytes += n
    os.close(fd)
    lat.sort()
    report = {
        "pid": os.getpid(),
        "count": len(lat),
        "bytes": nbytes,
        "mean_s": sum(lat) / len(lat) / 1e9,
        "p50_s": lat[len(lat) // 2] / 1e9,
        "p99_s": lat[int(len(lat) * 0.99)] / 1e9,
    }
    publish(args.report, json.dumps(report))
    time.sleep(args.linger)


if __name__ == "__main__":
    main()
