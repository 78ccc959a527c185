"""Workload side of stallmon's simulated NVML (``tests/nvml-standin``), standard library only.

The stand-in ``libnvml_standin.so`` simulates the GPUs described in the directory named by
``STALLMON_STANDIN_DIR`` (its contract is documented at the top of
``tests/nvml-standin/src/lib.rs``). Workloads feed it through files in that directory:

* ``gpu<i>/busy``: one ``<start_ns> <end_ns>`` line (``time.monotonic_ns()``) per finished GPU
  step; the library turns them into NVML utilization samples.
* ``gpu<i>/contexts``: ``<pid>`` when a process "opens a CUDA context", ``-<pid>`` when it closes
  it (a context also ends when the process exits); NVML lists these as running compute processes.

Example::

    write_scenario(d, 2, sample_period_ms=100, lag_ms=1000)   # before stallmon calls nvmlInit
    gpu = StandinGpu(d, 0)
    gpu.open_context()
    with gpu.busy():          # or gpu.step(start_ns, end_ns)
        time.sleep(0.05)
    gpu.close_context()
"""

import contextlib
import json
import os
import time

__all__ = ["StandinGpu", "write_scenario", "set_error", "clear_error"]


class StandinGpu:
    """Simulated GPU ``index`` of the stand-in directory ``dir``."""

    def __init__(self, dir, index):
        self.dir = os.path.join(os.fspath(dir), f"gpu{index}")
        os.makedirs(self.dir, exist_ok=True)
        self._busy = None

    def _append_line(self, name, line):
        # One write(2) on an O_APPEND descriptor: lines of concurrent writers never interleave.
        fd = os.open(os.path.join(self.dir, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def open_context(self):
        """Declares that this process holds a compute context on the GPU."""
        self._append_line("contexts", str(os.getpid()))

    def close_context(self):
        """Releases this process's compute context."""
        self._append_line("contexts", f"-{os.getpid()}")

    def step(self, start_ns, end_ns):
        """Records a finished GPU step (CLOCK_MONOTONIC ns); the line is flushed at once."""
        if self._busy is None:
            # Opened once: append mode (O_APPEND), line-buffered, so each line is one write.
            self._busy = open(os.path.join(self.dir, "busy"), "a", buffering=1)
        self._busy.write(f"{int(start_ns)} {int(end_ns)}\n")

    @contextlib.contextmanager
    def busy(self):
        """Context manager: the GPU is busy while the block runs (recorded when it ends)."""
        start = time.monotonic_ns()
        try:
            yield
        finally:
            self.step(start, time.monotonic_ns())

    def close(self):
        """Closes the busy file (steps can still be recorded: it is reopened)."""
        if self._busy is not None:
            self._busy.close()
            self._busy = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_scenario(dir, gpus, sample_period_ms=100, lag_ms=1000):
    """Writes ``dir/scenario.json`` (atomically) and creates the ``gpu<i>`` directories.

    ``gpus`` is a number of GPUs with default identities, or a list of dicts with any of
    ``uuid``, ``name``, ``pci_bus_id``, ``memory_total_bytes``. Returns the scenario path.
    """
    dir = os.fspath(dir)
    if isinstance(gpus, int):
        gpus = [{} for _ in range(gpus)]
    os.makedirs(dir, exist_ok=True)
    for i in range(len(gpus)):
        os.makedirs(os.path.join(dir, f"gpu{i}"), exist_ok=True)
    scenario = {"gpus": list(gpus), "sample_period_ms": sample_period_ms, "lag_ms": lag_ms}
    path = os.path.join(dir, "scenario.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(scenario, f, indent=1)
    os.replace(tmp, path)
    return path


def set_error(dir, index, error, functions=()):
    """Makes NVML calls on GPU ``index`` fail with ``error`` (e.g. ``"GPU_IS_LOST"``), for the
    listed NVML function names only if any are given. Written atomically."""
    path = os.path.join(os.fspath(dir), f"gpu{index}", "error")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(" ".join([error, ",".join(functions)]).strip() + "\n")
    os.replace(tmp, path)


def clear_error(dir, index):
    """Removes GPU ``index``'s injected error, if any."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(os.fspath(dir), f"gpu{index}", "error"))
