#!/usr/bin/env python3
"""A job of its own on a stand-in GPU: holds a compute context on GPU --gpu-index of --gpu-dir
for --seconds, doing "GPU steps" (sleeps while the simulated GPU is busy) with a little CPU work
between them. Writes the monotonic time (ns) at which it took the context to --started, if given.
With --setsid it first leaves its parent's session (a job started by a different user session).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from standin_gpu import StandinGpu  # noqa: E402
from publish import publish  # noqa: E402



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu-dir", required=True)
    ap.add_argument("--gpu-index", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--step-ms", type=float, default=40.0)
    ap.add_argument("--started")
    ap.add_argument("--setsid", action="store_true")
    args = ap.parse_args()
    if args.setsid:
        try:
            os.setsid()
        except OSError:
            pass
    gpu = StandinGpu(args.gpu_dir, args.gpu_index)
    gpu.open_context()
    if args.started:
        publish(args.started, str(time.monotonic_ns()))
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        start = time.monotonic_ns()
        time.sleep(args.step_ms / 1000.0)
        gpu.step(start, time.monotonic_ns())
        x = 0
        t = time.thread_time() + args.step_ms / 4000.0
        while time.thread_time() < t:
            x += 1
    gpu.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
