//! # nvml-standin: a simulated `libnvidia-ml.so` for testing stallmon without a GPU
//!
//! Build it (`cargo build -p nvml-standin` gives `target/<profile>/libnvml_standin.so`) and load
//! it in place of NVML, e.g. `Nvml::builder().lib_path(path).init()` with `nvml-wrapper`.
//! It exports NVML's C functions under their real names (list below) and simulates GPUs
//! described by files that tests and workloads write. Everything it reports is recognisably
//! simulated: `nvmlSystemGetDriverVersion` returns **`stallmon-standin`**, default UUIDs start
//! with `GPU-5afe0000-`, PCI device ids are `0x5AFE10DE`.
//!
//! ## The scenario directory (the contract)
//!
//! `nvmlInit_v2` / `nvmlInitWithFlags` (flags ignored) read the directory named by the
//! environment variable **`STALLMON_STANDIN_DIR`**. If it is unset or empty, or
//! `scenario.json` cannot be read, init fails with `NVML_ERROR_LIBRARY_NOT_FOUND`; if
//! `scenario.json` is invalid, with `NVML_ERROR_UNINITIALIZED`. Either way the reason is printed
//! on stderr and `nvmlErrorString(<that code>)` returns it until the next successful init.
//! Init is reference counted like NVML's: only the first init (after a complete shutdown) reads
//! the directory and starts a new timeline; the last `nvmlShutdown` drops all state.
//!
//! ```text
//! $STALLMON_STANDIN_DIR/
//!   scenario.json      read once, at init
//!   gpu<i>/busy        appended by workloads: "<start_ns> <end_ns>" per finished GPU step
//!   gpu<i>/contexts    appended by processes: "<pid>" opens a compute context, "-<pid>" closes it
//!   gpu<i>/error       optional: "<ERROR_NAME> [<function>,...]" makes NVML calls fail
//! ```
//!
//! ### `scenario.json`
//!
//! ```json
//! {"gpus": [{"uuid": "GPU-5afe0000-...", "name": "Stallmon Simulated GPU",
//!            "pci_bus_id": "00000000:3B:00.0", "memory_total_bytes": 85899345920}],
//!  "sample_period_ms": 100, "lag_ms": 1000}
//! ```
//!
//! * `gpus` (required, may be empty): GPU `i` (its position) has NVML index `i` and minor
//!   number `i` (device `nvidia<i>`). Every field is optional: `uuid` defaults to
//!   `GPU-5afe0000-0000-4000-8000-<i as 12 hex digits>`, `name` to `Stallmon Simulated GPU`,
//!   `pci_bus_id` to domain 0, bus `i + 1` (`00000000:01:00.0` for GPU 0), and
//!   `memory_total_bytes` to 80 GiB. `pci_bus_id` is `DDDDDDDD:BB:DD.F` (or `DDDD:BB:DD.F`), hex
//!   in either case; NVML reports it normalized to upper case with an 8-digit domain. UUIDs
//!   (< 80 bytes) and PCI addresses must be unique; names must be < 64 bytes.
//! * `sample_period_ms` (default 100, 1 to 86400000) and `lag_ms` (default 1000, at most
//!   86400000): see samples.
//! * `zombie_contexts` (default false): a process that exited keeps its contexts until its
//!   parent reaps it, as a real driver may still list an exiting process's context for a moment.
//! * Unknown fields are errors (to catch typos).
//!
//! ### `gpu<i>/busy`: utilization
//!
//! One line per finished GPU step, `<start_ns> <end_ns>`: two decimal integers on
//! `CLOCK_MONOTONIC` (Python's `time.monotonic_ns()`) separated by whitespace, `start <= end`.
//! Lines may come in any order and overlap (their union counts); the file may not exist yet and
//! may be appended while it is read. A last line without its newline is kept until it is
//! completed. Blank lines are ignored; other malformed lines are ignored and counted (first one
//! reported on stderr; counts via `stallmonStandinGetLineCounts`). The file is read at every NVML
//! call on the GPU, from where the previous read stopped (if it shrinks or is replaced, reading
//! restarts at its beginning; intervals already read are kept).
//!
//! Samples (`nvmlDeviceGetSamples` with `NVML_GPU_UTILIZATION_SAMPLES`): time is cut into
//! periods of `sample_period_ms` from `t0`, the `CLOCK_MONOTONIC` time of init. Period `k ≥ 0`
//! runs from `t0 + (k-1)·P` to `t0 + k·P`; period 0, which ends at init, is the *baseline* (its
//! value counts steps before init), so the first sample's timestamp is the init time. Period `k`
//! is published at the first NVML call on the GPU at or after `t0 + k·P + lag_ms`: its value is
//! the percentage (0..=100, a double: `NVML_VALUE_TYPE_DOUBLE`, not rounded) of the period covered
//! by the union of the busy intervals read by then. A step whose line arrives after its period
//! was published is not counted there (counted as "late"; keep `lag_ms` above the longest step
//! plus the write delay). The sample's timestamp is the period end on `CLOCK_REALTIME` in µs,
//! converted with the realtime − monotonic offset measured once at init (so consecutive
//! timestamps differ by exactly `P` in µs). `lastSeenTimeStamp` is honoured (only samples with a
//! timestamp greater than it); when there are none the call returns `NVML_ERROR_NOT_FOUND`, for
//! the count query (`samples == NULL`) as well. Each GPU keeps the newest 1000 samples (100 s
//! at the default period; the real driver keeps about 120); when more are due at once (a long
//! pause between calls) only the newest 1000 are computed.
//!
//! Gauges follow `u`, the utilization of the newest published sample (0 before the first):
//! temperature `40 + 40u` °C, power `70 + 300u` W (reported in mW), graphics/SM clock 1980 MHz
//! (memory 2619, video 1755), clock throttle/event reasons `GPU_IDLE` when `u == 0` else none,
//! PCIe throughput (KB/s) receive `1 000 000u` and transmit `250 000u`, utilization rates
//! `gpu = 100u`, `memory = 50u`. `nvmlDeviceGetProcessUtilization` always returns
//! `NVML_ERROR_NOT_FOUND` (no per-process samples).
//!
//! ### `gpu<i>/contexts`: compute processes
//!
//! Appended by processes: a line `<pid>` means the process holds a compute context on GPU `i`,
//! `-<pid>` removes it (same partial-line and garbage rules as `busy`; a shrunk or replaced file
//! is re-read from scratch). A context also disappears, for good, once `/proc/<pid>` is gone or
//! the process is a zombie (unless `zombie_contexts`). `nvmlDeviceGetComputeRunningProcesses_v3` (and `_v2`, and the
//! legacy unversioned one) list the remaining ones in the order they were opened, each using
//! 1 GiB (no MIG instance ids); memory info reports `used = 1 GiB × contexts` (capped at the
//! total), `free = total − used`, `reserved = 0`.
//!
//! ### `gpu<i>/error`: injected failures
//!
//! Read at every call, so it can appear, change and disappear mid-run. Its first word is an
//! NVML error name with or without the `NVML_ERROR_` prefix: `GPU_IS_LOST`, `NOT_SUPPORTED`,
//! `UNKNOWN`, `TIMEOUT`, or any other NVML return code name (`NO_PERMISSION`, `NO_DATA`, ...).
//! The optional rest lists NVML function names separated by commas (and/or whitespace); a name
//! without version suffix also matches its versioned functions (`nvmlDeviceGetSamples`,
//! `nvmlDeviceGetComputeRunningProcesses` matches `_v3`). Without a list, the error applies to
//! every call taking GPU `i`'s handle, and, for `GPU_IS_LOST` only, also to getting its handle
//! (`nvmlDeviceGetHandleByIndex_v2`, `ByUUID`, `ByPciBusId_v2`); with a list, exactly to the
//! listed functions (handle lookups included if listed). The call then returns that code
//! without doing anything. An empty file means no error; an unknown error name makes the file
//! ignored (reported once on stderr). `nvmlDeviceGetCount_v2` is never affected.
//!
//! ### `gpu<i>/delay`: a hanging driver
//!
//! Read at every call taking GPU `i`'s handle (after the `error` file): its first word is a
//! number of milliseconds (at most 600000) the call sleeps before it answers, as a driver
//! waiting on a GPU that stopped responding does. Missing or empty: no delay.
//!
//! ## Exported functions
//!
//! `nvmlInit_v2`, `nvmlInit`, `nvmlInitWithFlags`, `nvmlShutdown`, `nvmlErrorString`,
//! `nvmlSystemGetDriverVersion`, `nvmlSystemGetNVMLVersion`, `nvmlDeviceGetCount_v2`,
//! `nvmlDeviceGetHandleByIndex_v2`, `nvmlDeviceGetHandleByUUID`,
//! `nvmlDeviceGetHandleByPciBusId_v2`, `nvmlDeviceGetUUID`, `nvmlDeviceGetName`,
//! `nvmlDeviceGetIndex`, `nvmlDeviceGetMinorNumber`, `nvmlDeviceGetPciInfo_v3`,
//! `nvmlDeviceGetSamples`, `nvmlDeviceGetUtilizationRates`, `nvmlDeviceGetProcessUtilization`,
//! `nvmlDeviceGetComputeRunningProcesses_v3`, `nvmlDeviceGetComputeRunningProcesses_v2`,
//! `nvmlDeviceGetComputeRunningProcesses`, `nvmlDeviceGetMemoryInfo`,
//! `nvmlDeviceGetMemoryInfo_v2`, `nvmlDeviceGetTemperature`, `nvmlDeviceGetPowerUsage`,
//! `nvmlDeviceGetClockInfo`, `nvmlDeviceGetCurrentClocksThrottleReasons`,
//! `nvmlDeviceGetCurrentClocksEventReasons`, `nvmlDeviceGetPcieThroughput`; plus the non-NVML
//! `stallmonStandinGetLineCounts(device, *garbage, *late)` for debugging. Any other NVML
//! function is absent (`nvml-wrapper` then reports `FailedToLoadSymbol`). Before init (or after
//! the last shutdown) every call but init and `nvmlErrorString` returns
//! `NVML_ERROR_UNINITIALIZED`; an unknown handle gives `NVML_ERROR_INVALID_ARGUMENT`.
//!
//! Calls may come from any thread: one mutex guards all state. The library starts no threads;
//! all work (reading files, publishing samples) happens inside calls.

#![allow(non_snake_case)]

pub mod api;
pub mod contexts;
pub mod errfile;
pub mod ffi;
pub mod scenario;
pub mod state;
pub mod tail;
pub mod timeline;
