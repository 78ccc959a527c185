#!/usr/bin/env python3
"""A worker exits, and its PID comes back as a new worker (root only: /proc/sys/kernel/ns_last_pid).

The feeder forks worker A, which reads a little and exits; once A is reaped, the feeder asks the
kernel for A's PID again (ns_last_pid = A - 1) and forks worker B, which gets it, reads --mib
MiB of --file from the page cache over about --seconds, and exits. Writes {a, b, reused, bytes}
to --report (JSON), then lingers --linger seconds.
"""
import argparse
import json
import os
import time
from publish import publish  # noqa: E402


def read_file(path, total):
    got = 0
    while got < total:
        with open(path, "rb") as f:
            while got < total:
                b = f.read(1 << 20)
                if not b:
                    break
                got += len(b)
    return got



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", required=True)
    ap.add_argument("--mib", type=int, default=192)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--report", required=True)
    ap.add_argument("--linger", type=float, default=2.0)
    args = ap.parse_args()
    time.sleep(1.0)  # time for the tracer to attach and settle

    a = os.fork()
    if a == 0:
        read_file(args.file, 1 << 20)
        os._exit(0)
    os.waitpid(a, 0)

    b = None
    for _ in range(200):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(a - 1))
        pid = os.fork()
        if pid == 0:
            if os.getpid() != a:
                os._exit(1)
            total = args.mib << 20
            step = total // 8
            got = 0
            for _ in range(8):
                got += read_file(args.file, step)
                time.sleep(args.seconds / 8)
            os._exit(0)
        if pid == a:
            b = pid
            break
        os.waitpid(pid, 0)
    if b is not None:
        # Poll, like a feeder that has other things to do (a parent blocked in waitpid on its
        # only child is a wrapper, and stallmon rightly hands the feeder role to the child).
        while os.waitpid(b, os.WNOHANG) == (0, 0):
            time.sleep(0.05)
    publish(args.report, json.dumps({"a": a, "b": b, "reused": b == a, "bytes": args.mib << 20}))
    time.sleep(args.linger)


if __name__ == "__main__":
    main()
