#!/usr/bin/env python3
"""A training-loop imitation that knows its own truth (Python 3 standard library only).

The *feeder* (this process's main thread) takes batches and runs "GPU steps"; the data come from
real files of a dataset directory, read by real worker processes (``--workers N``, multiprocessing
with the ``fork``, ``spawn`` or ``forkserver`` start method) or by the feeder itself
(``--workers 0``: synchronous loading).

The "GPU" is GPU ``--gpu-index`` of the stand-in NVML library's scenario directory ``--gpu-dir``
(``tests/nvml-standin``, see ``standin_gpu.py``): the feeder holds a compute context on it from its
first statement, and every GPU step is appended as ``<start_ns> <end_ns>`` (CLOCK_MONOTONIC,
``time.monotonic_ns()``), one flushed line per step. stallmon reads it back through NVML
(``--nvml-lib``). During a step the feeder sleeps (``time.sleep``: off CPU, ``other_wait``) while
the simulated GPU is busy.

Nothing is printed on stdout (under ``stallmon trace --json`` the job's stdout is stallmon's).

Ground truth (``--truth FILE``, JSON, written at the very end)
---------------------------------------------------------------
The feeder keeps a cursor on its own timeline from the first statement of this script (``t0_ns``)
to the last instant before it exits (``t1_ns``). Every nanosecond of ``[t0, t1]`` is either a GPU
step (busy) or belongs to one recorded segment of idle time, classified with the SAME definitions
as stallmon's attribution contract (docs/method.md, /work/shared/notes/attribution.md):

* **waiting for a batch** (``q.get()``, the feeder is blocked on the result queue's pipe): the
  feeder's own CPU time during the call (locking, unpickling) is **host**; the rest is split
  between **io** and **preprocess** in the ratio of the producing worker's measured wall time
  reading that batch's files vs preprocessing it (checksums + ``--cpu-ms`` of CPU per file).
  Workers send these timings with the batch.
* **reading files itself** (``--workers 0``): CPU time → **host**, the rest (blocked in ``read``) →
  **io**. The contract says feeder ``storage_wait`` → io.
* **the feeder's own CPU work** (start-up, its own preprocessing with ``--workers 0``, the
  ``--host-ms`` per-step "launch overhead", bookkeeping): time spent runnable but waiting for a
  CPU (preempted: the kernel's run-queue delay, ``/proc/thread-self/schedstat``) → **other**, the
  rest → **host**. The rest includes time the hypervisor stole from the vCPU while the feeder was
  running: the kernel (and so the tracer) sees the thread on CPU then, and the contract says feeder
  on CPU → host. (Without schedstat: CPU time → host, the rest → other.) NOTE: with
  ``--workers 0`` the feeder's CPU preprocessing is *host*, not preprocess: in the contract,
  feeder ``on_cpu`` is host and only *workers'* CPU time is preprocess. The truth deliberately
  uses the contract's definitions.
* **shutdown** (terminating and joining the workers): CPU time → **host**, the rest (blocked in
  ``waitpid``) → **other**.

CPU time is the thread CPU clock (``time.thread_time_ns()``); "the rest" is wall minus CPU time, the
time off CPU, which the tracer classifies by the reason the thread slept.

Outside ``[t0, t1]`` the workload knows nothing: the interpreter's start before ``t0`` and the time
after ``t1`` until the tracer stops are added by the test (see tests/tests/attribution.rs), which
may use ``t0_run_delay_ns`` (the feeder's run-queue delay since the thread started, at ``t0``).

The dataset should exist before the traced run (``--prepare``): creating it inside the run writes
and fsyncs files, which the truth would count as host/other. ``prepared_in_run`` says if it happened.
With ``--uncached`` every file's pages are dropped from the page cache right after it is read
(``posix_fadvise(POSIX_FADV_DONTNEED)``), so every epoch reads the disk again.
"""

import os
import time

T0_NS = time.monotonic_ns()  # the first instant of the workload's own timeline
T0_CPU_NS = time.thread_time_ns()


def _schedstat_fd():
    try:
        return os.open("/proc/thread-self/schedstat", os.O_RDONLY)
    except OSError:
        return None


_SCHEDSTAT = _schedstat_fd()


def run_delay_ns():
    """The calling thread's run-queue delay so far (runnable, not running), or None."""
    if _SCHEDSTAT is None:
        return None
    return int(os.pread(_SCHEDSTAT, 128, 0).split()[1])


T0_RUN_DELAY_NS = run_delay_ns()

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from publish import publish  # noqa: E402

CAUSES = ("io", "preprocess", "host", "other")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset directory (created if missing)")
    p.add_argument("--files", type=int, default=200, help="files in the dataset")
    p.add_argument("--file-kib", type=int, default=256, help="size of each file, KiB")
    p.add_argument("--prepare", action="store_true",
                   help="create the dataset and exit (with --uncached: and evict it from the "
                   "page cache, so that the run starts cold)")
    p.add_argument("--workers", type=int, default=4, help="worker processes (0: synchronous)")
    p.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default="fork")
    p.add_argument("--batch-files", type=int, default=4, help="files per batch")
    p.add_argument("--cpu-ms", type=float, default=0.0,
                   help="CPU time burnt per file by its preprocessing, ms")
    p.add_argument("--host-ms", type=float, default=0.0,
                   help="CPU time the feeder spends per step before launching it, ms")
    p.add_argument("--gpu-ms", type=float, default=50.0, help="length of a GPU step, ms")
    p.add_argument("--prefetch", type=int, default=0,
                   help="result queue capacity in batches (default 2 x workers)")
    p.add_argument("--uncached", action="store_true",
                   help="drop each file's pages from the page cache after reading it")
    p.add_argument("--seconds", type=float, default=15.0, help="training time")
    p.add_argument("--gpu-dir", help="stand-in NVML scenario directory (see standin_gpu.py)")
    p.add_argument("--gpu-index", type=int, default=None,
                   help="the stand-in GPU this feeder drives (default: LOCAL_RANK, else 0)")
    p.add_argument("--truth", help="write the ground truth (JSON) here")
    p.add_argument("--timeline", help="debugging: write every truth segment (JSON lines) here")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Dataset


def dataset_files(data, n):
    return [os.path.join(data, "item-%05d.bin" % i) for i in range(n)]


def prepare(data, n, kib):
    """Creates missing or short files of random bytes, fsync'd. Returns True if it wrote any."""
    os.makedirs(data, exist_ok=True)
    wrote = False
    for path in dataset_files(data, n):
        try:
            if os.stat(path).st_size == kib * 1024:
                continue
        except FileNotFoundError:
            pass
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(os.urandom(kib * 1024))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        wrote = True
    if wrote:
        fd = os.open(data, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return wrote


def evict(files):
    """Drops the files' pages from the page cache (clean pages only: prepare() fsyncs)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_file(path, uncached):
    """Reads a whole file with read(2); optionally drops its pages from the page cache after."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
        if uncached:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return b"".join(chunks)


def burn(ms):
    """Spends `ms` milliseconds of this thread's CPU time on arithmetic ("decoding")."""
    if ms <= 0:
        return 0
    end = time.thread_time_ns() + int(ms * 1e6)
    x = 1
    while time.thread_time_ns() < end:
        for _ in range(500):
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF
    return x


def preprocess(chunks, cpu_ms):
    """Cheap part (a checksum per file) plus `cpu_ms` of CPU per file."""
    digest = 0
    for data in chunks:
        digest = zlib.crc32(data, digest)
        burn(cpu_ms)
    return digest


# ---------------------------------------------------------------------------------------------
# Workers


def worker_main(wid, nworkers, files, batch_files, cpu_ms, uncached, q):
    """Produces batches forever (the feeder terminates us): read files, preprocess, put.

    Each batch carries its producer's timings: wall ns reading its files and wall ns
    preprocessing it. The payload itself is small (a checksum), like a decoded batch that
    would live in shared memory, so that unpickling it costs the feeder next to nothing.
    """
    mine = files[wid::nworkers] or files
    i = 0
    seq = 0
    while True:
        t0 = time.monotonic_ns()
        chunks = []
        for _ in range(batch_files):
            chunks.append(read_file(mine[i % len(mine)], uncached))
            i += 1
        t1 = time.monotonic_ns()
        digest = preprocess(chunks, cpu_ms)
        t2 = time.monotonic_ns()
        q.put((wid, seq, digest, t1 - t0, t2 - t1))
        seq += 1


# ---------------------------------------------------------------------------------------------
# The feeder's own record


class Truth:
    """Cursor over the feeder's timeline; see the module docstring for the rules."""

    def __init__(self, t0_ns, cpu0_ns, rq0_ns, timeline=None):
        self.t = t0_ns
        self.cpu = cpu0_ns
        self.rq = rq0_ns  # run-queue delay at the cursor (None: no schedstat)
        self.timeline = timeline  # list of segments, or None
        self.idle = dict.fromkeys(CAUSES, 0)  # ns (floats after splits)
        self.busy = 0
        self.steps = 0
        self.batches = 0
        self.wait_ns = 0
        self.worker_read_ns = 0
        self.worker_prep_ns = 0
        self.feeder_read_ns = 0

    def _advance(self, kind):
        """Closes the segment since the cursor: (now, wall, CPU time, run-queue delay or None)."""
        now = time.monotonic_ns()
        cpu = time.thread_time_ns()
        rq = run_delay_ns()
        wall = max(0, now - self.t)
        used = min(wall, max(0, cpu - self.cpu))
        queued = None if rq is None or self.rq is None else min(wall, max(0, rq - self.rq))
        if self.timeline is not None:
            self.timeline.append((kind, self.t, now, used, queued))
        self.t, self.cpu, self.rq = now, cpu, rq
        return now, wall, used, queued

    def work(self):
        """Closes a segment of the feeder's own CPU work: waiting for a CPU -> other, the rest
        (on CPU) -> host."""
        now, wall, used, queued = self._advance("work")
        if queued is None:
            queued = wall - used
        self.idle["host"] += wall - queued
        self.idle["other"] += queued
        return now

    def blocking(self):
        """Closes a segment where the feeder may block on something other than data (waitpid):
        CPU -> host, off CPU -> other."""
        now, wall, used, _ = self._advance("blocking")
        self.idle["host"] += used
        self.idle["other"] += wall - used
        return now

    def read(self):
        """Closes a segment of the feeder reading files: CPU -> host, blocked -> io."""
        now, wall, used, _ = self._advance("read")
        self.idle["host"] += used
        self.idle["io"] += wall - used
        self.feeder_read_ns += wall
        return now

    def wait(self, read_ns, prep_ns):
        """Closes a wait for a batch whose producer read for `read_ns` and preprocessed for
        `prep_ns`: CPU -> host, the rest split io : preprocess = read_ns : prep_ns."""
        now, wall, used, _ = self._advance("wait")
        self.idle["host"] += used
        rest = wall - used
        total = read_ns + prep_ns
        if total > 0:
            self.idle["io"] += rest * read_ns / total
            self.idle["preprocess"] += rest * prep_ns / total
        else:
            self.idle["other"] += rest
        self.batches += 1
        self.wait_ns += wall
        self.worker_read_ns += read_ns
        self.worker_prep_ns += prep_ns
        return now

    def step(self, start_ns, end_ns):
        """A GPU step [start, end): busy. The cursor must be at `start_ns` (closed just before)."""
        self.busy += end_ns - start_ns
        self.steps += 1
        if self.timeline is not None:
            self.timeline.append(("step", start_ns, end_ns, 0, 0))
        self.t = end_ns
        self.cpu = time.thread_time_ns()
        self.rq = run_delay_ns()

    def report(self, args, extra):
        s = 1e-9
        idle = {c: v * s for c, v in self.idle.items()}
        out = {
            "pid": os.getpid(),
            "t0_ns": T0_NS,
            "t1_ns": self.t,
            "t0_run_delay_ns": T0_RUN_DELAY_NS,
            "t0_cpu_ns": T0_CPU_NS,
            "wall_s": (self.t - T0_NS) * s,
            "busy_s": self.busy * s,
            "idle_s": idle,
            "idle_total_s": sum(idle.values()),
            "steps": self.steps,
            "batches": self.batches,
            "wait_s": self.wait_ns * s,
            "worker_read_s": self.worker_read_ns * s,
            "worker_preprocess_s": self.worker_prep_ns * s,
            "feeder_read_s": self.feeder_read_ns * s,
            "workers": args.workers,
            "start_method": args.start_method,
            "definitions": "stallmon contract: feeder on CPU -> host, feeder blocked read -> io, "
            "batch wait -> io:preprocess by the producer's read:preprocess wall time, "
            "feeder preempted or blocked otherwise -> other",
            "schedstat": T0_RUN_DELAY_NS is not None,
        }
        out.update(extra)
        return out


# ---------------------------------------------------------------------------------------------
# The training loop


class NoGpu:
    def step(self, start_ns, end_ns):
        pass


def open_gpu(args):
    """The feeder's stand-in GPU, with a compute context held from now on (or nothing)."""
    if not args.gpu_dir:
        return NoGpu()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from standin_gpu import StandinGpu

    index = args.gpu_index
    if index is None:
        index = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = StandinGpu(args.gpu_dir, index)
    gpu.open_context()
    return gpu


def gpu_step(truth, gpu, gpu_ms):
    """Runs one GPU step: the feeder sleeps while the (simulated) GPU is busy."""
    start = truth.work()
    time.sleep(gpu_ms / 1000.0)
    end = time.monotonic_ns()
    truth.step(start, end)
    gpu.step(start, end)  # host work after the step, closed by the next segment



def main(argv):
    args = parse_args(argv)
    if args.prepare:
        prepare(args.data, args.files, args.file_kib)
        if args.uncached:
            evict(dataset_files(args.data, args.files))
        return 0
    if args.workers < 0 or args.batch_files < 1:
        sys.exit("--workers must be >= 0 and --batch-files >= 1")
    truth = Truth(T0_NS, T0_CPU_NS, T0_RUN_DELAY_NS, [] if args.timeline else None)
    prepared_in_run = prepare(args.data, args.files, args.file_kib)
    files = dataset_files(args.data, args.files)
    gpu = open_gpu(args)
    procs = []
    q = None
    if args.workers > 0:
        ctx = mp.get_context(args.start_method)
        q = ctx.Queue(maxsize=args.prefetch or 2 * args.workers)
        for wid in range(args.workers):
            p = ctx.Process(
                target=worker_main,
                args=(wid, args.workers, files, args.batch_files, args.cpu_ms, args.uncached, q),
                daemon=True,
            )
            p.start()
            procs.append(p)
    truth.work()  # start-up

    deadline = time.monotonic_ns() + int(args.seconds * 1e9)
    i = 0
    while time.monotonic_ns() < deadline:
        if q is not None:
            truth.work()
            _wid, _seq, _digest, read_ns, prep_ns = q.get()
            truth.wait(read_ns, prep_ns)
        else:
            chunks = []
            for _ in range(args.batch_files):
                chunks.append(read_file(files[i % len(files)], args.uncached))
                i += 1
            truth.read()
            preprocess(chunks, args.cpu_ms)  # the feeder's own CPU: host (see module doc)
        burn(args.host_ms)  # "Python overhead and kernel launches"
        gpu_step(truth, gpu, args.gpu_ms)

    truth.work()
    for p in procs:
        p.terminate()
    for p in procs:
        p.join()
    truth.blocking()  # shutdown
    if args.truth:
        report = truth.report(args, {"prepared_in_run": prepared_in_run})
        publish(args.truth, json.dumps(report, indent=1))
    if args.timeline:
        with open(args.timeline, "w") as f:
            for seg in truth.timeline:
                f.write(json.dumps(seg) + "\n")
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stderr.flush()
    # Exit at once: the truth ends here, and interpreter finalization would add feeder time the
    # truth does not cover (the queue and workers are already gone).
    os._exit(code)
