//! The keys and values of the BPF maps and the ring-buffer records.
use crate::{HIST_SLOTS, NUM_FD_KINDS, NUM_ROLES, NUM_STATES};

/// Struct member offsets and enum values of the running kernel, resolved from BTF by user space
/// at load time and handed to the programs as a read-only global (a small, explicit form of
/// CO-RE). The programs add them to typed (BTF) pointers, so the verifier checks every access
/// against the kernel's own layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_files: u32,
    /// Byte holding the `in_iowait:1` bitfield of `task_struct`, and the bit mask inside it.
    pub task_in_iowait_byte: u32,
    pub task_in_iowait_mask: u32,
    pub task_signal: u32,
    pub task_start_time: u32,
    pub task_ioac: u32,
    pub signal_live: u32,
    pub ioac_rchar: u32,
    pub ioac_syscr: u32,
    pub ioac_read_bytes: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_inode: u32,
    pub inode_mode: u32,
    pub rq_cmd_flags: u32,
    pub rq_data_len: u32,
    pub rq_q: u32,
    pub rq_start_time_ns: u32,
    /// `request.rq_flags` and `request.io_start_time_ns`: the block layer's own issue time,
    /// set when the request carries `RQF_STATS` (the mask `rqf_stats`).
    pub rq_rq_flags: u32,
    pub rq_io_start_time_ns: u32,
    pub rqf_stats: u32,
    pub queue_disk: u32,
    pub disk_major: u32,
    pub disk_first_minor: u32,
    pub regs_orig_ax: u32,
    pub regs_di: u32,
    /// `pt_regs.ax`: `-ENOSYS` while a syscall runs (the entry code stores it there and the
    /// return value replaces it only at exit), the user's `rax` in an exception.
    pub regs_ax: u32,
    pub _pad2: u32,
    /// `(1 << REQ_OP_BITS) - 1`, where REQ_OP_BITS is the first value of `enum req_flag_bits`.
    pub req_op_mask: u32,
    /// `enum req_op` values.
    pub req_op_read: u32,
    pub req_op_write: u32,
    pub req_op_flush: u32,
    pub req_op_discard: u32,
    /// Passthrough operations (`REQ_OP_DRV_IN`, `REQ_OP_DRV_OUT`): never timed by the kernel.
    pub req_op_drv_in: u32,
    pub req_op_drv_out: u32,
    /// Non-zero when `task_struct.ioac` exists (CONFIG_TASK_XACCT / TASK_IO_ACCOUNTING).
    pub has_ioac: u32,
    pub _pad: u32,
}

/// Read-only configuration of the kernel programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub offsets: KernelOffsets,
}

/// Per-rank-slot settings written by user space (`SLOT_CONF`, indexed by slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotConf {
    /// Thread whose state changes are streamed for attribution; 0 = the feeder process's main
    /// thread.
    pub feeder_tid: u32,
    pub _pad: u32,
}

/// One tracked process (key: tgid). Counters are cumulative since the process became tracked and
/// are updated with atomic adds, since its threads run on several CPUs at once. User space never
/// writes an entry (it would race with those adds); it only creates and deletes them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcInfo {
    /// `TRACKED` value when the entry was created (informational: roles change in `TRACKED`).
    pub tracked: u32,
    pub parent_tgid: u32,
    /// Set by the kernel when the whole thread group has exited; user space deletes the entry
    /// after it has read the final counters.
    pub exited: u32,
    pub execs: u32,
    /// `task_struct.start_time` of the group leader (CLOCK_MONOTONIC ns): tells a process from
    /// a later one with the same PID.
    pub start_ns: u64,
    pub state_ns: [u64; NUM_STATES],
    /// Sleeps inside read-family calls, by fd kind: count and time.
    pub stall_count: [u64; NUM_FD_KINDS],
    pub stall_ns: [u64; NUM_FD_KINDS],
    /// `--syscalls` only: completed read-family calls by fd kind.
    pub read_count: [u64; NUM_FD_KINDS],
    pub read_bytes: [u64; NUM_FD_KINDS],
    pub read_ns: [u64; NUM_FD_KINDS],
    /// The kernel's per-task I/O accounting (`rchar`, `syscr`, `read_bytes`) of the process's
    /// threads that exited (the live ones' is in `/proc/PID/task/TID/io`). Not the process's
    /// `/proc/PID/io`, which also holds the children it reaped.
    pub io_rchar: u64,
    pub io_syscr: u64,
    pub io_read_bytes: u64,
}

/// A read call in progress (`TaskState::read_kind`), or none.
pub const READ_NONE: u32 = u32::MAX;

/// Per-thread state, in task storage.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TaskState {
    /// The `TRACKED` value this thread is accounted under (a role change in `TRACKED` moves it).
    pub tracked: u32,
    pub tgid: u32,
    /// Current state (`STATE_*`) and since when (monotonic ns, `bpf_ktime_get_ns`).
    pub state: u32,
    /// fd kind + 1 of the read-family call the thread is blocked in (0: not in a read stall).
    pub stall_kind: u32,
    pub since_ns: u64,
    /// Non-zero once the thread has exited (its last switch must not account anything).
    pub exited: u32,
    /// `--syscalls`: fd kind of the read call in progress, or `READ_NONE`.
    pub read_kind: u32,
    pub read_start_ns: u64,
    /// The thread's share of its process's counters (`ProcInfo`) not yet added there: they are
    /// added at most every `PROC_FLUSH_NS` and when the thread exits, so that a context switch
    /// needs no process lookup.
    pub pending_state_ns: [u64; NUM_STATES],
    pub pending_stall_count: [u64; NUM_FD_KINDS],
    pub pending_stall_ns: [u64; NUM_FD_KINDS],
    pub flushed_ns: u64,
}

/// How long a thread's process counters may wait in its `TaskState` (user space reads them
/// every interval; a second's figures miss at most this much of each live thread's time).
pub const PROC_FLUSH_NS: u64 = 20_000_000;

/// Per-slot, per-role totals, one per CPU (`SLOT_STATS`, indexed by `slot_index`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SlotStats {
    pub state_ns: [u64; NUM_STATES],
    /// Block requests (and bytes) submitted by the slot's processes of this role.
    pub blk_count: u64,
    pub blk_bytes: u64,
}

/// Threads currently in each state and the sum of their `since_ns` (`OPEN`, indexed by
/// `slot_index`), so that user space can add the time they have spent in it so far without
/// walking threads: open time at `now` is `count * now - since_sum`, over the wrapping sum of
/// the per-CPU values.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenIntervals {
    pub count: [u64; NUM_STATES],
    pub since_sum: [u64; NUM_STATES],
}

/// Sleeps inside read-family calls (`STALLS`, indexed by `slot_index * NUM_FD_KINDS + kind`;
/// shared, atomic adds: one update per stall, not per call).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StallStats {
    pub count: u64,
    pub sum_ns: u64,
    pub hist: [u64; HIST_SLOTS],
}

/// `--syscalls`: completed read-family calls (`READS`, per CPU, indexed like `STALLS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadStats {
    pub count: u64,
    pub bytes: u64,
    pub errors: u64,
    pub sum_ns: u64,
    pub hist: [u64; HIST_SLOTS],
}

/// An in-flight block request the kernel does not time itself, in slot `inflight_slot(rq)` of a
/// direct-mapped array; `rq` is the `struct request *` that owns the slot (0 = free).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Inflight {
    pub rq: u64,
    pub issue_ns: u64,
}

/// Per device and operation (`BLOCK_STATS`, per CPU, indexed by `dev slot * NUM_OPS + op`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockStats {
    /// Completed requests and their bytes (partial completions add bytes, not requests).
    pub count: u64,
    pub bytes: u64,
    pub errors: u64,
    /// Requests with a known issue time (issued after attach) and the sum of their latencies.
    pub lat_count: u64,
    pub lat_sum_ns: u64,
    /// Requests with a known start time (`request.start_time_ns`, set by the block layer when
    /// the request is allocated) and the sum of start-to-issue times.
    pub queue_count: u64,
    pub queue_sum_ns: u64,
    /// Requests and bytes submitted by tracked job processes (all jobs), by role, counted at
    /// submission.
    pub job_count: [u64; NUM_ROLES],
    pub job_bytes: [u64; NUM_ROLES],
    /// Issue -> complete and start -> issue histograms.
    pub lat_hist: [u64; HIST_SLOTS],
    pub queue_hist: [u64; HIST_SLOTS],
}

/// Ring-buffer record kinds.
/// A feeder thread changed state: `slot`, `tid`, `state`.
pub const EVENT_FEEDER_STATE: u32 = 0;
/// A tracked process exec'd (a launcher's environment may now name a rank): `tgid`.
pub const EVENT_EXEC: u32 = 1;
/// A tracked process exited: `tgid`, `slot`.
pub const EVENT_EXIT: u32 = 2;
/// A launcher forked a process: `tgid` the child, `tid` the parent process. Launchers fork
/// rarely; their children may be a rank's process that forks its DataLoader workers at once,
/// before the next full pass would have found it.
pub const EVENT_FORK: u32 = 3;

/// One ring-buffer record. Only feeder threads' state changes, job processes' exec/exit and
/// launchers' forks go through the ring buffer: nothing per I/O or per syscall.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Event {
    pub ts_ns: u64,
    pub kind: u32,
    pub slot: u32,
    pub tgid: u32,
    pub tid: u32,
    pub state: u32,
    pub _pad: u32,
}
