//! Wire types shared by the kernel programs (`monitor-ebpf`) and user space (`stallmon`).
//!
//! Everything here is `#[repr(C)]`, plain old data, and fixed-size: these structs are the keys and
//! values of the BPF maps and the records of the feeder ring buffer. Change them on both sides at
//! once (they live in one place precisely so that cannot be forgotten).
#![no_std]

/// Number of log2 histogram slots. Slot `i` counts values `v` (in microseconds, truncated) with
/// `bits(v) == i`: slot 0 holds `v < 1 us`, slot `i > 0` holds `2^(i-1) <= v < 2^i` us. The upper
/// bound of slot `i` is therefore `2^i` us, which is the Prometheus `le` bound of that bucket.
/// The last slot also absorbs everything larger (about 36 minutes and up).
pub const HIST_SLOTS: usize = 32;

/// Process roles. The feeder is the target process; workers are its descendants.
pub const ROLE_FEEDER: u32 = 0;
pub const ROLE_WORKER: u32 = 1;
pub const NUM_ROLES: usize = 2;
pub const ROLE_NAMES: [&str; NUM_ROLES] = ["feeder", "worker"];

/// What a read syscall's file descriptor refers to.
pub const FD_FILE: u32 = 0; // regular file or block device
pub const FD_IPC: u32 = 1; // pipe (FIFO) or socket
pub const FD_OTHER: u32 = 2; // anything else (tty, eventfd, char device, ...)
pub const NUM_FD_KINDS: usize = 3;
pub const FD_KIND_NAMES: [&str; NUM_FD_KINDS] = ["file", "ipc", "other"];

/// Thread states (see docs/method.md).
pub const STATE_ON_CPU: u32 = 0;
pub const STATE_STORAGE_WAIT: u32 = 1;
pub const STATE_IPC_WAIT: u32 = 2;
pub const STATE_OTHER_WAIT: u32 = 3;
pub const NUM_STATES: usize = 4;
pub const STATE_NAMES: [&str; NUM_STATES] = ["on_cpu", "storage_wait", "ipc_wait", "other_wait"];
/// Feeder event state: the feeder thread exited (attribution treats it as unknown -> other).
pub const STATE_EXITED: u32 = u32::MAX;

/// Slots of the `ROLE_OPEN` array: (thread count, sum of since_ns) per role and state.
pub const OPEN_SLOTS: usize = NUM_ROLES * NUM_STATES * 2;

#[inline(always)]
pub const fn open_index(role: u32, state: u32) -> usize {
    ((role as usize) * NUM_STATES + state as usize) * 2
}

/// Block operations (from `cmd_flags & REQ_OP_MASK`).
pub const OP_READ: u32 = 0;
pub const OP_WRITE: u32 = 1;
pub const OP_FLUSH: u32 = 2;
pub const OP_DISCARD: u32 = 3;
pub const OP_OTHER: u32 = 4;
pub const NUM_OPS: usize = 5;
pub const OP_NAMES: [&str; NUM_OPS] = ["read", "write", "flush", "discard", "other"];

/// Reasons an event was lost; each one is a per-CPU counter in the `DROPS` map.
pub const DROP_INFLIGHT_FULL: u32 = 0;
pub const DROP_BLOCK_STATS_FULL: u32 = 1;
pub const DROP_PROCS_FULL: u32 = 2;
pub const DROP_THREADS_FULL: u32 = 3;
pub const DROP_FEEDER_RINGBUF_FULL: u32 = 4;
pub const DROP_KERNEL_READ_FAILED: u32 = 5;
/// A process id beyond the TRACKED array (pid_max raised after load).
pub const DROP_PID_OUT_OF_RANGE: u32 = 6;
pub const NUM_DROPS: usize = 7;
pub const DROP_NAMES: [&str; NUM_DROPS] = [
    "inflight_slot_collision",
    "block_stats_map_full",
    "procs_map_full",
    "threads_map_full",
    "feeder_ringbuf_full",
    "kernel_read_failed",
    "pid_out_of_range",
];

/// Default size of the pid-indexed `TRACKED` array; user space sets it to the running kernel's
/// `pid_max` at load time.
pub const DEFAULT_PID_SLOTS: u32 = 4 * 1024 * 1024;

/// Map sizes (fixed at compile time; every failed insert is counted in `DROPS`).
pub const MAX_PROCS: u32 = 8192;
pub const MAX_THREADS: u32 = 65536;
/// Slots of the direct-mapped in-flight request array (a power of two: `INFLIGHT_SLOT_BITS`).
pub const INFLIGHT_SLOT_BITS: u32 = 14;
pub const MAX_INFLIGHT: u32 = 1 << INFLIGHT_SLOT_BITS;

/// Slot of a `struct request *` in the in-flight array (Fibonacci hashing of the pointer).
#[inline(always)]
pub const fn inflight_slot(rq: u64) -> u32 {
    ((rq >> 6).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - INFLIGHT_SLOT_BITS)) as u32
}
pub const MAX_BLOCK_KEYS: u32 = 256;
pub const FEEDER_RINGBUF_BYTES: u32 = 256 * 1024;

/// Struct member offsets in the running kernel, resolved from BTF by user space at load time and
/// handed to the programs as a read-only global (a small, explicit form of CO-RE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_files: u32,
    /// Byte holding the `in_iowait:1` bitfield of `task_struct`, and the bit mask inside it.
    pub task_in_iowait_byte: u32,
    pub task_in_iowait_mask: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_inode: u32,
    pub inode_mode: u32,
    pub rq_cmd_flags: u32,
    pub rq_data_len: u32,
    pub rq_q: u32,
    pub queue_disk: u32,
    pub disk_major: u32,
    pub disk_first_minor: u32,
}

/// Read-only configuration of the kernel programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub offsets: KernelOffsets,
    /// Thread id of the feeder thread (the thread that launches GPU work); 0 = none.
    pub feeder_tid: u32,
    pub _pad: u32,
}

/// One tracked process (key: tgid). Counters are cumulative since the process became tracked and
/// are updated with atomic adds, since its threads run on several CPUs at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcInfo {
    pub role: u32,
    pub parent_tgid: u32,
    /// Set by the kernel when the whole thread group has exited; user space deletes the entry
    /// after it has read the final counters.
    pub exited: u32,
    pub execs: u32,
    pub state_ns: [u64; NUM_STATES],
    pub read_count: [u64; NUM_FD_KINDS],
    pub read_bytes: [u64; NUM_FD_KINDS],
    pub read_ns: [u64; NUM_FD_KINDS],
    pub blk_count: u64,
    pub blk_bytes: u64,
}

/// An in-flight read syscall of a thread.
pub const READ_NONE: u32 = u32::MAX;

/// One tracked thread (key: tid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadInfo {
    pub tgid: u32,
    pub role: u32,
    /// Current state (`STATE_*`) and since when (monotonic ns, `bpf_ktime_get_ns`).
    pub state: u32,
    /// fd kind of the read syscall in progress, or `READ_NONE`.
    pub read_kind: u32,
    pub since_ns: u64,
    pub read_start_ns: u64,
}

/// Per-role statistics, one per CPU (PerCpuArray indexed by role).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RoleStats {
    pub state_ns: [u64; NUM_STATES],
    pub read: [ReadStats; NUM_FD_KINDS],
    pub blk_count: u64,
    pub blk_bytes: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ReadStats {
    pub count: u64,
    pub bytes: u64,
    pub errors: u64,
    pub sum_ns: u64,
    pub hist: [u64; HIST_SLOTS],
}

/// An in-flight block request, in slot `inflight_slot(rq)` of a direct-mapped array; `rq` is the
/// `struct request *` that owns the slot (0 = free).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Inflight {
    pub rq: u64,
    pub insert_ns: u64,
    pub issue_ns: u64,
    /// Role + 1 of the job process that submitted it, 0 when the submitter is not in the job.
    pub submit_role: u32,
    pub submit_tgid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BlockKey {
    /// Kernel dev_t of the disk: `major << 20 | minor`.
    pub dev: u32,
    pub op: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockStats {
    /// Completed requests and their bytes (partial completions add bytes, not requests).
    pub count: u64,
    pub bytes: u64,
    pub errors: u64,
    /// Requests with a known issue time (issued after attach) and the sum of their latencies.
    pub lat_count: u64,
    pub lat_sum_ns: u64,
    pub queue_count: u64,
    pub queue_sum_ns: u64,
    /// Requests and bytes submitted by job processes, by role.
    pub job_count: [u64; NUM_ROLES],
    pub job_bytes: [u64; NUM_ROLES],
    /// Issue -> complete and insert -> issue histograms (one value, so one lookup per request).
    pub lat_hist: [u64; HIST_SLOTS],
    pub queue_hist: [u64; HIST_SLOTS],
}

/// A state change of the feeder thread, sent through the `FEEDER_EVENTS` ring buffer (one thread
/// only, and only when its state changes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FeederEvent {
    pub ts_ns: u64,
    pub tid: u32,
    pub state: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C) plain data with no padding holes that matter and no
    // pointers; any bit pattern is valid.
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for ProcInfo {}
    unsafe impl aya::Pod for ThreadInfo {}
    unsafe impl aya::Pod for RoleStats {}
    unsafe impl aya::Pod for Inflight {}
    unsafe impl aya::Pod for BlockKey {}
    unsafe impl aya::Pod for BlockStats {}
    unsafe impl aya::Pod for FeederEvent {}
}

/// Histogram slot of a duration in nanoseconds (see [`HIST_SLOTS`]).
#[inline(always)]
pub fn hist_slot(ns: u64) -> usize {
    let us = ns / 1000;
    let mut bits = 0usize;
    let mut v = us;
    // Branchy log2 that the BPF backend compiles without a ctlz libcall.
    if v >= 1 << 32 {
        v >>= 32;
        bits += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        bits += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        bits += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        bits += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        bits += 2;
    }
    if v >= 1 << 1 {
        v >>= 1;
        bits += 1;
    }
    bits += v as usize; // v is 0 or 1 here
    if bits >= HIST_SLOTS {
        HIST_SLOTS - 1
    } else {
        bits
    }
}

/// Upper bound, in seconds, of histogram slot `i` (the Prometheus `le` of that bucket).
pub fn slot_upper_seconds(i: usize) -> f64 {
    (1u64 << i) as f64 * 1e-6
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn slots_match_bounds() {
        assert_eq!(hist_slot(0), 0);
        assert_eq!(hist_slot(999), 0);
        assert_eq!(hist_slot(1000), 1);
        assert_eq!(hist_slot(1999), 1);
        assert_eq!(hist_slot(2000), 2);
        assert_eq!(hist_slot(3999), 2);
        assert_eq!(hist_slot(4000), 3);
        assert_eq!(hist_slot(u64::MAX), HIST_SLOTS - 1);
        // Every value lies at or below its slot's upper bound and above the previous one.
        for ns in [1u64, 1500, 65_000, 1_000_000, 83_000_000, 5_000_000_000] {
            let s = hist_slot(ns);
            let secs = ns as f64 * 1e-9;
            assert!(secs <= slot_upper_seconds(s) + 1e-6, "{ns} in slot {s}");
            if s > 0 {
                assert!(
                    secs >= slot_upper_seconds(s - 1) - 1e-12,
                    "{ns} in slot {s}"
                );
            }
        }
    }
}
