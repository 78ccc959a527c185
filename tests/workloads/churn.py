#!/usr/bin/env python3
"""Forks --count short-lived children (each exits at once), --batch at a time, then lingers."""
import argparse
import os
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--linger", type=float, default=3.0)
    args = ap.parse_args()
    time.sleep(0.5)
    done = 0
    while done < args.count:
        kids = []
        for _ in range(min(args.batch, args.count - done)):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            kids.append(pid)
        for pid in kids:
            os.waitpid(pid, 0)
        done += len(kids)
    time.sleep(args.linger)


if __name__ == "__main__":
    main()
