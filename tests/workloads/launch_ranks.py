#!/usr/bin/env python3
"""A torchrun-like launcher: starts one process per rank from a JSON spec, with the rank
variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, TORCHELASTIC_RUN_ID), polls them like torchrun's agent does (it sleeps, it does not
sit in wait()), and exits with the first non-zero status (or 0).

The spec: {"run_id": "...", "ranks": [{"argv": [...], "cgroup": "/sys/fs/cgroup/blkio/x" or
null}, ...]}. A rank with a cgroup joins it before it execs (a genuinely slow disk for one rank).
"""
import json
import os
import subprocess
import sys
import time


def main():
    spec = json.load(open(sys.argv[1]))
    ranks = spec["ranks"]
    procs = []
    for i, r in enumerate(ranks):
        env = dict(os.environ)
        env.update(
            RANK=str(i),
            LOCAL_RANK=str(i),
            WORLD_SIZE=str(len(ranks)),
            LOCAL_WORLD_SIZE=str(len(ranks)),
            GROUP_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT="29500",
            TORCHELASTIC_RUN_ID=spec.get("run_id", "none"),
        )
        cgroup = r.get("cgroup")

        def join(cg=cgroup):
            if cg:
                with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                    f.write("0")

        procs.append(subprocess.Popen(r["argv"], env=env, preexec_fn=join))
    status = 0
    while procs:
        time.sleep(0.1)
        for p in list(procs):
            rc = p.poll()
            if rc is not None:
                procs.remove(p)
                if rc and not status:
                    status = rc
    return status


if __name__ == "__main__":
    sys.exit(main())
