//! Wire types shared by the kernel programs (`monitor-ebpf`) and user space (`stallmon`).
//!
//! Everything in [`wire`] is `#[repr(C)]`, plain old data and fixed-size: the keys and values of
//! the BPF maps and the records of the ring buffers. [`abi`] names the few kernel constants that
//! BTF cannot give (syscall numbers, file-type bits), with where they come from. Change these on
//! both sides at once: they live in one place precisely so that cannot be forgotten.
//!
//! With the `user` feature, [`merge`] adds what user space does with them: summing per-CPU
//! values, splitting device numbers, decoding tracked-process values.
#![no_std]

pub mod abi;
pub mod wire;

#[cfg(feature = "user")]
pub mod merge;

pub use wire::*;

/// Number of log2 histogram slots. Slot `i` counts values `v` (in microseconds, truncated) with
/// `bits(v) == i`: slot 0 holds `v < 1 us`, slot `i > 0` holds `2^(i-1) <= v < 2^i` us. The upper
/// bound of slot `i` is therefore `2^i` us, which is the Prometheus `le` bound of that bucket.
/// The last slot also absorbs everything larger (about 36 minutes and up).
pub const HIST_SLOTS: usize = 32;

/// Process roles. A feeder is the process whose main thread drives a rank's GPU; workers are its
/// descendants (DataLoader workers); launchers are every other process of a job (shells,
/// torchrun's agent, `timeout`, `srun`): tracked so that their children are followed, never
/// accounted.
pub const ROLE_FEEDER: u32 = 0;
pub const ROLE_WORKER: u32 = 1;
pub const ROLE_LAUNCHER: u32 = 2;
/// Roles whose threads are accounted (feeder and worker).
pub const NUM_ROLES: usize = 2;
/// Names of every role, accounted ones first.
pub const ROLE_NAMES: [&str; 3] = ["feeder", "worker", "launcher"];

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
/// Runnable but not running: preempted, or not yet run after fork (waiting for a CPU).
pub const STATE_CPU_WAIT: u32 = 4;
pub const NUM_STATES: usize = 5;
pub const STATE_NAMES: [&str; NUM_STATES] = [
    "on_cpu",
    "storage_wait",
    "ipc_wait",
    "other_wait",
    "cpu_wait",
];
/// Feeder event state: the feeder thread exited (attribution treats it as unknown -> other).
pub const STATE_EXITED: u32 = u32::MAX;

/// Block operations, as exported (the kernel's `enum req_op` values are resolved from BTF).
pub const OP_READ: u32 = 0;
pub const OP_WRITE: u32 = 1;
pub const OP_FLUSH: u32 = 2;
pub const OP_DISCARD: u32 = 3;
pub const OP_OTHER: u32 = 4;
pub const NUM_OPS: usize = 5;
pub const OP_NAMES: [&str; NUM_OPS] = ["read", "write", "flush", "discard", "other"];

/// Reasons an event was lost; each one is a per-CPU counter in the `DROPS` map.
pub const DROP_INFLIGHT_FULL: u32 = 0;
pub const DROP_BLOCK_DEVICES_FULL: u32 = 1;
pub const DROP_PROCS_FULL: u32 = 2;
pub const DROP_TASK_STORAGE_FAILED: u32 = 3;
pub const DROP_RINGBUF_FULL: u32 = 4;
pub const DROP_KERNEL_READ_FAILED: u32 = 5;
/// A process id beyond the TRACKED array (pid_max raised after load).
pub const DROP_PID_OUT_OF_RANGE: u32 = 6;
/// A rank slot beyond the per-slot arrays.
pub const DROP_SLOT_OUT_OF_RANGE: u32 = 7;
/// A process entry of an exited process was reused by a new process with the same PID before
/// user space read its final counters (its last interval is lost from the per-process record).
pub const DROP_EXITED_OVERWRITTEN: u32 = 8;
/// A tracked task without a process entry (the entry was removed concurrently).
pub const DROP_PROC_ENTRY_MISSING: u32 = 9;
pub const NUM_DROPS: usize = 10;
pub const DROP_NAMES: [&str; NUM_DROPS] = [
    "inflight_slot_collision",
    "block_device_slots_full",
    "procs_map_full",
    "task_storage_failed",
    "ringbuf_full",
    "kernel_read_failed",
    "pid_out_of_range",
    "slot_out_of_range",
    "exited_process_overwritten",
    "process_entry_missing",
];

/// Default size of the pid-indexed `TRACKED` array; user space sets it to the running kernel's
/// `pid_max` at load time.
pub const DEFAULT_PID_SLOTS: u32 = 4 * 1024 * 1024;
/// Default number of rank slots (user space sets the per-slot arrays to `--max-ranks`).
pub const DEFAULT_SLOTS: u32 = 32;
/// Tracked processes at once (all jobs).
pub const MAX_PROCS: u32 = 16384;
/// Slots of the direct-mapped in-flight request array (a power of two: `INFLIGHT_SLOT_BITS`).
pub const INFLIGHT_SLOT_BITS: u32 = 14;
pub const MAX_INFLIGHT: u32 = 1 << INFLIGHT_SLOT_BITS;
/// Block devices (direct-mapped by a hash of the device number, linear probing over
/// [`DEV_PROBES`] slots).
pub const DEV_SLOT_BITS: u32 = 6;
pub const MAX_DEVS: u32 = 1 << DEV_SLOT_BITS;
pub const DEV_PROBES: u32 = 4;
pub const EVENTS_RINGBUF_BYTES: u32 = 256 * 1024;

/// Slot of a `struct request *` in the in-flight array (Fibonacci hashing of the pointer).
#[inline(always)]
pub const fn inflight_slot(rq: u64) -> u32 {
    ((rq >> 6).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - INFLIGHT_SLOT_BITS)) as u32
}

/// First probe slot of a device number in the device table.
#[inline(always)]
pub const fn dev_slot(dev: u32) -> u32 {
    ((dev as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - DEV_SLOT_BITS)) as u32
}

/// Kernel `dev_t` from major and minor (`MKDEV`: 12 bits of major, 20 of minor).
#[inline(always)]
pub const fn mkdev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xfffff)
}

/// The value of a tracked process in the `TRACKED` array: 0 = untracked, else slot and role.
/// Launchers carry their job's index in the slot field (they have no per-slot statistics).
#[inline(always)]
pub const fn tracked_value(slot: u32, role: u32) -> u32 {
    ((slot << 2) | (role & 3)) + 1
}

/// `(slot, role)` of a non-zero `TRACKED` value.
#[inline(always)]
pub const fn tracked_parts(value: u32) -> (u32, u32) {
    let v = value.wrapping_sub(1);
    (v >> 2, v & 3)
}

/// Index of `(slot, role)` in the per-slot arrays (accounted roles only).
#[inline(always)]
pub const fn slot_index(slot: u32, role: u32) -> u32 {
    slot * NUM_ROLES as u32 + role
}

/// Histogram slot of a duration in nanoseconds (see [`HIST_SLOTS`]): the number of bounds
/// `1000 * 2^j` ns (`j >= 0`) at or below `ns`, found by binary search with shifts and
/// compares only (a 64-bit division costs more than the rest of it on the hot paths).
#[inline(always)]
pub fn hist_slot(ns: u64) -> usize {
    let mut c = 0u32;
    // 1000 << 31 fits easily; c stays below 32 = HIST_SLOTS.
    if ns >= 1000u64 << (c + 15) {
        c += 16;
    }
    if ns >= 1000u64 << (c + 7) {
        c += 8;
    }
    if ns >= 1000u64 << (c + 3) {
        c += 4;
    }
    if ns >= 1000u64 << (c + 1) {
        c += 2;
    }
    if ns >= 1000u64 << c {
        c += 1;
    }
    let c = c as usize;
    if c >= HIST_SLOTS { HIST_SLOTS - 1 } else { c }
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

    #[test]
    fn slots_agree_with_microsecond_log2() {
        let reference = |ns: u64| {
            let us = ns / 1000;
            let bits = (u64::BITS - us.leading_zeros()) as usize;
            bits.min(HIST_SLOTS - 1)
        };
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ns = x >> (x % 64);
            assert_eq!(hist_slot(ns), reference(ns), "{ns}");
        }
        for k in 0..40 {
            let b = 1000u64 << k;
            for ns in [b - 1, b, b + 1] {
                assert_eq!(hist_slot(ns), reference(ns), "{ns}");
            }
        }
    }

    #[test]
    fn tracked_values_round_trip() {
        for slot in [0, 1, 31, 1000] {
            for role in [ROLE_FEEDER, ROLE_WORKER, ROLE_LAUNCHER] {
                let v = tracked_value(slot, role);
                assert_ne!(v, 0);
                assert_eq!(tracked_parts(v), (slot, role));
            }
        }
    }

    #[test]
    fn hashes_stay_in_range() {
        for x in [0u64, 1, 0xffff_8880_1234_5600, u64::MAX] {
            assert!(inflight_slot(x) < MAX_INFLIGHT);
            assert!(dev_slot(x as u32) < MAX_DEVS);
        }
        assert_eq!(mkdev(254, 0), 254 << 20);
    }
}
