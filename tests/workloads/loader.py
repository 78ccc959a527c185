#!/usr/bin/env python3
"""A DataLoader-style job: a feeder process and N worker processes.

Workers are started the way PyTorch's DataLoader starts them (multiprocessing with the fork,
spawn or forkserver start method; spawn and forkserver fork and exec a fresh interpreter). Each
worker reads whole files of a dataset directory (buffered reads, so through the page cache
unless --drop-cache evicts each file after reading it), optionally burns CPU per item, and sends
items to the feeder through a multiprocessing queue (a pipe). The feeder blocks on the queue.

Writes a JSON report (--report) with its own PID, the workers' PIDs and what was read, then
optionally holds (--hold) before exiting so that a test can observe the job after the workers
have exited.
"""
import argparse
import json
import multiprocessing as mp
import os
import time
from publish import publish  # noqa: E402


def make_dataset(path, files, kib):
    os.makedirs(path, exist_ok=True)
    for i in range(files):
        p = os.path.join(path, f"item{i:05d}.bin")
        if not os.path.exists(p) or os.path.getsize(p) != kib * 1024:
            with open(p, "wb") as f:
                f.write(os.urandom(kib * 1024))
                f.flush()
                os.fsync(f.fileno())


def burn(ms):
    end = time.perf_counter() + ms / 1000.0
    x = 0
    while time.perf_counter() < end:
        x += 1
    return x


def worker(wid, nworkers, paths, rounds, cpu_ms, drop_cache, out):
    for r in range(rounds):
        for i in range(wid, len(paths), nworkers):
            with open(paths[i], "rb") as f:
                data = f.read()
                if drop_cache:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            if cpu_ms:
                burn(cpu_ms)
            out.put((wid, len(data)))
    out.put(None)


def start_gpu(gpu_dir):
    """The feeder holds a context on stand-in GPU 0, busy 60 ms out of every 100 ms (a thread)."""
    import sys
    import threading

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from standin_gpu import StandinGpu

    gpu = StandinGpu(gpu_dir, 0)
    gpu.open_context()

    def steps():
        while True:
            start = time.monotonic_ns()
            time.sleep(0.06)
            gpu.step(start, time.monotonic_ns())
            time.sleep(0.04)

    threading.Thread(target=steps, daemon=True).start()



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--kib", type=int, default=256)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cpu-ms", type=float, default=0.0)
    ap.add_argument("--start-method", default="fork", choices=["fork", "spawn", "forkserver"])
    ap.add_argument("--drop-cache", action="store_true")
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--hold", type=float, default=0.0)
    ap.add_argument("--report", required=True)
    ap.add_argument("--create", action="store_true")
    ap.add_argument("--gpu-dir", help="hold a context on stand-in GPU 0 there, busy 60 ms of 100")
    args = ap.parse_args()

    if args.create:
        make_dataset(args.data, args.files, args.kib)
        return
    time.sleep(args.delay)
    if args.gpu_dir:
        start_gpu(args.gpu_dir)
    paths = sorted(os.path.join(args.data, p) for p in os.listdir(args.data))[: args.files]
    ctx = mp.get_context(args.start_method)
    q = ctx.Queue(maxsize=max(2, 2 * args.workers))
    procs = [
        ctx.Process(
            target=worker,
            args=(w, args.workers, paths, args.rounds, args.cpu_ms, args.drop_cache, q),
        )
        for w in range(args.workers)
    ]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    worker_pids = [p.pid for p in procs]
    done, items, nbytes = 0, 0, 0
    while done < len(procs):
        item = q.get()  # the feeder blocks on the pipe here
        if item is None:
            done += 1
            continue
        items += 1
        nbytes += item[1]
    for p in procs:
        p.join()
    report = {
        "pid": os.getpid(),
        "worker_pids": worker_pids,
        "start_method": args.start_method,
        "items": items,
        "bytes": nbytes,
        "seconds": time.monotonic() - t0,
    }
    publish(args.report, json.dumps(report))
    time.sleep(args.hold)


if __name__ == "__main__":
    main()
