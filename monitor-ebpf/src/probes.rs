use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_current_task, bpf_ktime_get_ns, bpf_task_pt_regs},
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePointContext, TracePointContext},
};
use monitor_common::*;

/// Filled in by user space at load time (struct offsets from BTF, feeder thread).
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    offsets: KernelOffsets {
        task_pid: 0,
        task_tgid: 0,
        task_files: 0,
        task_in_iowait_byte: 0,
        task_in_iowait_mask: 0,
        files_fdt: 0,
        fdtable_max_fds: 0,
        fdtable_fd: 0,
        file_inode: 0,
        inode_mode: 0,
        rq_cmd_flags: 0,
        rq_data_len: 0,
        rq_q: 0,
        queue_disk: 0,
        disk_major: 0,
        disk_first_minor: 0,
    },
    feeder_tid: 0,
    _pad: 0,
};

// ---------------------------------------------------------------------------------------------
// Maps
// ---------------------------------------------------------------------------------------------

/// Tracked processes by tgid, as an array indexed by pid (value: role + 1, 0 = untracked). The
/// verifier inlines array lookups, so the early exit of untracked tasks costs no helper call.
/// User space sizes it to the kernel's pid_max at load time.
#[map]
static TRACKED: Array<u32> = Array::with_max_entries(DEFAULT_PID_SLOTS, 0);
/// Tracked processes, by tgid. User space seeds the target (and its existing descendants).
#[map]
static PROCS: HashMap<u32, ProcInfo> = HashMap::with_max_entries(MAX_PROCS, 0);
/// Tracked threads, by tid: current state and the read syscall in progress.
#[map]
static THREADS: HashMap<u32, ThreadInfo> = HashMap::with_max_entries(MAX_THREADS, 0);
/// Per-role totals (state time, read syscalls), per CPU.
#[map]
static ROLE_STATS: PerCpuArray<RoleStats> = PerCpuArray::with_max_entries(NUM_ROLES as u32, 0);
/// Block requests in flight: a direct-mapped array indexed by a hash of the `struct request *`
/// (no hash-map insert and delete per request; a slot taken by another live request is counted
/// as a collision and overwritten).
#[map]
static INFLIGHT: Array<Inflight> = Array::with_max_entries(MAX_INFLIGHT, 0);
#[map]
static BLOCK_STATS: PerCpuHashMap<BlockKey, BlockStats> =
    PerCpuHashMap::with_max_entries(MAX_BLOCK_KEYS, 0);
/// An all-zero `BlockStats` (too large for the BPF stack) to insert new keys from.
#[map]
static ZERO_BLOCK_STATS: PerCpuArray<BlockStats> = PerCpuArray::with_max_entries(1, 0);
/// Open intervals per role and state, so that user space can add the time that threads have spent
/// in their current state so far without walking every thread: for index `open_index(role,
/// state)`, element 0 is the number of threads in that state and element 1 the sum of their
/// `since_ns`; open time at `now` is `count * now - sum` (wrapping arithmetic, atomic adds).
#[map]
static ROLE_OPEN: Array<u64> = Array::with_max_entries(OPEN_SLOTS as u32, 0);
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_DROPS as u32, 0);
/// State changes of the feeder thread only.
#[map]
static FEEDER_EVENTS: RingBuf = RingBuf::with_byte_size(FEEDER_RINGBUF_BYTES, 0);

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn config() -> Config {
    // Volatile: the value is patched into .rodata at load time, the compiler must not fold it.
    unsafe { core::ptr::read_volatile(&CONFIG) }
}

#[inline(always)]
fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn drop_event(reason: u32) {
    if let Some(c) = DROPS.get_ptr_mut(reason) {
        unsafe { *c += 1 };
    }
}

/// Reads a `T` at `base + off` in kernel memory.
#[inline(always)]
fn rd<T>(base: u64, off: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T).ok() }
}

#[inline(always)]
fn atomic_add(slot: &mut u64, v: u64) {
    // Threads of one process run on several CPUs at once: shared counters take atomic adds.
    // `AtomicU64::fetch_add` is not offered on BPF (no CAS), but the XADD instruction is.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            slot, v,
        )
    };
}

#[inline(always)]
fn hist_add(hist: &mut [u64; HIST_SLOTS], ns: u64) {
    let slot = hist_slot(ns);
    if let Some(h) = hist.get_mut(slot) {
        *h += 1;
    }
}

/// Role + 1 of process `tgid` if tracked, else 0: one inlined array lookup.
#[inline(always)]
fn tracked(tgid: u32) -> u32 {
    match TRACKED.get(tgid) {
        Some(v) => *v,
        None => 0,
    }
}

#[inline(always)]
fn set_tracked(tgid: u32, role_plus_one: u32) {
    match TRACKED.get_ptr_mut(tgid) {
        Some(v) => unsafe { *v = role_plus_one },
        None => drop_event(DROP_PID_OUT_OF_RANGE),
    }
}

// ---------------------------------------------------------------------------------------------
// Thread state accounting
// ---------------------------------------------------------------------------------------------

/// Adds the time since `t.since_ns` to the thread's current state, then restarts the clock.
#[inline(always)]
fn close_interval(t: &mut ThreadInfo, now: u64) {
    let dt = now.saturating_sub(t.since_ns);
    t.since_ns = now;
    let st = t.state as usize;
    if st >= NUM_STATES || dt == 0 {
        return;
    }
    open_move(t.role, t.state, 0, dt);
    if let Some(rs) = ROLE_STATS.get_ptr_mut(t.role) {
        let rs = unsafe { &mut *rs };
        if let Some(s) = rs.state_ns.get_mut(st) {
            *s += dt;
        }
    }
    if let Some(p) = PROCS.get_ptr_mut(&t.tgid) {
        let p = unsafe { &mut *p };
        if let Some(s) = p.state_ns.get_mut(st) {
            atomic_add(s, dt);
        }
    }
}

/// Adds `dn` threads and `dsum` nanoseconds (both wrapping, so "minus" works) to the open-interval
/// counters of `(role, state)`.
#[inline(always)]
fn open_move(role: u32, state: u32, dn: u64, dsum: u64) {
    let i = open_index(role, state);
    if dn != 0
        && let Some(c) = ROLE_OPEN.get_ptr_mut(i as u32)
    {
        atomic_add(unsafe { &mut *c }, dn);
    }
    if dsum != 0
        && let Some(c) = ROLE_OPEN.get_ptr_mut(i as u32 + 1)
    {
        atomic_add(unsafe { &mut *c }, dsum);
    }
}

/// A thread enters (`enter == true`) or leaves the open-interval counters at `now`, which must
/// equal its `since_ns`.
#[inline(always)]
fn open_enter_leave(role: u32, state: u32, now: u64, enter: bool) {
    if enter {
        open_move(role, state, 1, now);
    } else {
        open_move(role, state, 1u64.wrapping_neg(), now.wrapping_neg());
    }
}

/// Moves a thread to `state` at `now` (its open interval was just closed, so `since_ns == now`).
#[inline(always)]
fn set_state(t: &mut ThreadInfo, tid: u32, state: u32, now: u64) {
    let changed = t.state != state;
    if changed {
        open_enter_leave(t.role, t.state, now, false);
        open_enter_leave(t.role, state, now, true);
    }
    t.state = state;
    if changed && tid == config().feeder_tid {
        let ev = FeederEvent {
            ts_ns: now,
            tid,
            state,
        };
        if FEEDER_EVENTS.output(&ev, 0).is_err() {
            drop_event(DROP_FEEDER_RINGBUF_FULL);
        }
    }
}

/// The thread entry of a tracked task, created on first sight.
#[inline(always)]
fn thread_entry(tid: u32, tgid: u32, role: u32, now: u64) -> Option<*mut ThreadInfo> {
    if let Some(t) = THREADS.get_ptr_mut(&tid) {
        return Some(t);
    }
    let t = ThreadInfo {
        tgid,
        role,
        state: STATE_ON_CPU,
        read_kind: READ_NONE,
        since_ns: now,
        read_start_ns: 0,
    };
    if THREADS.insert(&tid, &t, BPF_NOEXIST as u64).is_err() {
        drop_event(DROP_THREADS_FULL);
        return None;
    }
    open_enter_leave(role, STATE_ON_CPU, now, true);
    THREADS.get_ptr_mut(&tid)
}

// x86-64 syscall numbers of calls that wait for another process or thread (the DataLoader's
// result queue lives behind these): poll, select, recvfrom, recvmsg, epoll_wait, futex,
// pselect6, ppoll, epoll_pwait, recvmmsg, epoll_pwait2, futex_waitv, msgrcv, semop,
// semtimedop, mq_timedreceive.
#[inline(always)]
fn is_ipc_wait_syscall(nr: u64) -> bool {
    matches!(
        nr,
        7 | 23 | 45 | 47 | 232 | 202 | 270 | 271 | 281 | 299 | 441 | 449 | 70 | 65 | 220 | 243
    )
}

/// Offset of `orig_ax` in x86-64 `struct pt_regs` (a fixed ABI layout).
const PT_REGS_ORIG_AX: u32 = 120;
const TASK_DEAD_OR_EXITING: u32 = 0x0080 | 0x0010 | 0x0020; // TASK_DEAD | EXIT_DEAD | EXIT_ZOMBIE

/// Why a thread that is going off CPU is waiting.
#[inline(always)]
fn off_cpu_state(t: &ThreadInfo, preempt: bool, prev_state: u32, task: u64) -> u32 {
    if preempt || prev_state == 0 {
        // Still runnable (preempted or yielded): waiting for a CPU, not for data.
        return STATE_OTHER_WAIT;
    }
    let o = config().offsets;
    if let Some(b) = rd::<u8>(task, o.task_in_iowait_byte)
        && (b as u32) & o.task_in_iowait_mask != 0
    {
        // Sleeping in io_schedule(): direct I/O, page-cache misses, mmap page faults.
        return STATE_STORAGE_WAIT;
    }
    match t.read_kind {
        FD_FILE => return STATE_STORAGE_WAIT,
        FD_IPC => return STATE_IPC_WAIT,
        _ => {}
    }
    let regs = unsafe { bpf_task_pt_regs(task as *mut _) } as u64;
    if let Some(nr) = rd::<u64>(regs, PT_REGS_ORIG_AX)
        && is_ipc_wait_syscall(nr)
    {
        return STATE_IPC_WAIT;
    }
    STATE_OTHER_WAIT
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let preempt: u64 = ctx.arg(0);
    let prev: u64 = ctx.arg(1);
    let next: u64 = ctx.arg(2);
    let prev_state: u64 = ctx.arg(3);
    let prev_state = prev_state as u32;
    // The clock is read only when a tracked task is involved: this runs on every context switch
    // of the machine.
    let mut now = 0;

    // prev is the current task.
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tid, tgid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
    if tracked(tgid) != 0
        && let Some(p) = PROCS.get_ptr(&tgid)
    {
        now = now_ns();
        let p = unsafe { &*p };
        let existing = THREADS.get_ptr_mut(&tid);
        let t = match existing {
            Some(t) => Some(t),
            None if p.exited == 0 && prev_state & TASK_DEAD_OR_EXITING == 0 => {
                thread_entry(tid, tgid, p.role, now)
            }
            None => None,
        };
        if let Some(t) = t {
            let t = unsafe { &mut *t };
            close_interval(t, now);
            let st = off_cpu_state(t, preempt & 1 != 0, prev_state, prev);
            set_state(t, tid, st, now);
        }
    }

    let o = config().offsets;
    if let Some(next_tgid) = rd::<u32>(next, o.task_tgid)
        && tracked(next_tgid) != 0
        && let Some(next_tid) = rd::<u32>(next, o.task_pid)
        && let Some(t) = THREADS.get_ptr_mut(&next_tid)
    {
        let t = unsafe { &mut *t };
        if now == 0 {
            now = now_ns();
        }
        close_interval(t, now);
        set_state(t, next_tid, STATE_ON_CPU, now);
    }
    0
}

// ---------------------------------------------------------------------------------------------
// The job: fork / exec / exit
// ---------------------------------------------------------------------------------------------

#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tracked(tgid) == 0 {
        return 0;
    }
    let Some(p) = PROCS.get_ptr(&tgid) else {
        return 0;
    };
    let parent_role = unsafe { (*p).role };
    let child: u64 = ctx.arg(1);
    let o = config().offsets;
    let (Some(child_pid), Some(child_tgid)) =
        (rd::<u32>(child, o.task_pid), rd::<u32>(child, o.task_tgid))
    else {
        drop_event(DROP_KERNEL_READ_FAILED);
        return 0;
    };
    let now = now_ns();
    let role = if child_tgid == tgid {
        parent_role // a new thread of a tracked process
    } else {
        let info = ProcInfo {
            role: ROLE_WORKER,
            parent_tgid: tgid,
            ..ProcInfo::default()
        };
        if let Err(e) = PROCS.insert(&child_tgid, &info, BPF_NOEXIST as u64)
            && e != -17
        {
            drop_event(DROP_PROCS_FULL);
            return 0;
        }
        set_tracked(child_tgid, ROLE_WORKER + 1);
        ROLE_WORKER
    };
    if let Some(stale) = THREADS.get_ptr_mut(&child_pid) {
        // A leftover entry under a recycled tid: retire it from the open counters first.
        let stale = unsafe { &mut *stale };
        close_interval(stale, now);
        open_enter_leave(stale.role, stale.state, now, false);
        let _ = THREADS.remove(&child_pid);
    }
    let t = ThreadInfo {
        tgid: child_tgid,
        role,
        state: STATE_OTHER_WAIT, // runnable, has not run yet
        read_kind: READ_NONE,
        since_ns: now,
        read_start_ns: 0,
    };
    if THREADS.insert(&child_pid, &t, BPF_NOEXIST as u64).is_err() {
        drop_event(DROP_THREADS_FULL);
        return 0;
    }
    open_enter_leave(role, STATE_OTHER_WAIT, now, true);
    0
}

/// `sched:sched_process_exit` (classic): the exiting task is current; `group_dead` at offset 32.
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(ctx: TracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tid, tgid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
    if tracked(tgid) == 0 {
        return 0;
    }
    let Some(p) = PROCS.get_ptr_mut(&tgid) else {
        return 0;
    };
    if let Some(t) = THREADS.get_ptr_mut(&tid) {
        let t = unsafe { &mut *t };
        let now = now_ns();
        close_interval(t, now);
        open_enter_leave(t.role, t.state, now, false);
        let _ = THREADS.remove(&tid);
        if tid == config().feeder_tid {
            // The feeder is gone: its last state must not run on until user space notices.
            let ev = FeederEvent {
                ts_ns: now,
                tid,
                state: STATE_EXITED,
            };
            if FEEDER_EVENTS.output(&ev, 0).is_err() {
                drop_event(DROP_FEEDER_RINGBUF_FULL);
            }
        }
    }
    let group_dead: u8 = unsafe { ctx.read_at(32) }.unwrap_or(0);
    if group_dead != 0 {
        // User space reads the final counters, then deletes the entry.
        unsafe { (*p).exited = 1 };
        set_tracked(tgid, 0);
    }
    0
}

/// `sched:sched_process_exec` (classic): counts execs (the spawn/forkserver start methods exec a
/// fresh interpreter; the process keeps its tgid and stays tracked).
#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(_ctx: TracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tracked(tgid) != 0
        && let Some(p) = PROCS.get_ptr_mut(&tgid)
    {
        unsafe { (*p).execs += 1 };
    }
    0
}

// ---------------------------------------------------------------------------------------------
// Read syscalls of the job
// ---------------------------------------------------------------------------------------------

const S_IFMT: u16 = 0o170000;
const S_IFREG: u16 = 0o100000;
const S_IFBLK: u16 = 0o060000;
const S_IFIFO: u16 = 0o010000;
const S_IFSOCK: u16 = 0o140000;

/// What `fd` of the current task refers to: current->files->fdt->fd[fd]->f_inode->i_mode.
#[inline(always)]
fn fd_kind(fd: u64) -> u32 {
    let o = config().offsets;
    let task = unsafe { bpf_get_current_task() };
    let Some(files) = rd::<u64>(task, o.task_files) else {
        return FD_OTHER;
    };
    let Some(fdt) = rd::<u64>(files, o.files_fdt) else {
        return FD_OTHER;
    };
    let Some(max_fds) = rd::<u32>(fdt, o.fdtable_max_fds) else {
        return FD_OTHER;
    };
    if fd >= max_fds as u64 {
        return FD_OTHER;
    }
    let Some(fds) = rd::<u64>(fdt, o.fdtable_fd) else {
        return FD_OTHER;
    };
    let Some(file) = rd::<u64>(fds, (fd * 8) as u32) else {
        return FD_OTHER;
    };
    let Some(inode) = rd::<u64>(file, o.file_inode) else {
        return FD_OTHER;
    };
    let Some(mode) = rd::<u16>(inode, o.inode_mode) else {
        return FD_OTHER;
    };
    match mode & S_IFMT {
        S_IFREG | S_IFBLK => FD_FILE,
        S_IFIFO | S_IFSOCK => FD_IPC,
        _ => FD_OTHER,
    }
}

/// x86-64 numbers of the read family: read, pread64, readv, preadv, preadv2.
#[inline(always)]
fn is_read_syscall(id: u64) -> bool {
    matches!(id, 0 | 17 | 19 | 295 | 327)
}

/// Offset of `di` (the first syscall argument) in x86-64 `struct pt_regs`.
const PT_REGS_DI: u32 = 112;

/// `raw_syscalls:sys_enter(regs, id)` as a BTF tracepoint: no perf record is built, and every
/// syscall but the read family leaves after one compare.
#[btf_tracepoint(function = "sys_enter")]
pub fn sys_enter(ctx: BtfTracePointContext) -> i32 {
    let id: u64 = ctx.arg(1);
    if !is_read_syscall(id) {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tid, tgid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
    let role = tracked(tgid);
    if role == 0 {
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    let fd: u64 = rd::<u64>(regs, PT_REGS_DI).unwrap_or(u64::MAX);
    let kind = fd_kind(fd);
    let now = now_ns();
    if let Some(t) = thread_entry(tid, tgid, role - 1, now) {
        let t = unsafe { &mut *t };
        t.read_kind = kind;
        t.read_start_ns = now;
    }
    0
}

/// `raw_syscalls:sys_exit(regs, ret)`: closes the read in progress of a tracked thread.
#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit(ctx: BtfTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if tracked((pid_tgid >> 32) as u32) == 0 {
        return 0;
    }
    let tid = pid_tgid as u32;
    let Some(t) = THREADS.get_ptr_mut(&tid) else {
        return 0;
    };
    let t = unsafe { &mut *t };
    let kind = t.read_kind;
    if kind as usize >= NUM_FD_KINDS {
        return 0;
    }
    t.read_kind = READ_NONE;
    let ret: i64 = ctx.arg(1);
    let lat = now_ns().saturating_sub(t.read_start_ns);
    let bytes = if ret > 0 { ret as u64 } else { 0 };
    if let Some(rs) = ROLE_STATS.get_ptr_mut(t.role) {
        let rs = unsafe { &mut *rs };
        if let Some(r) = rs.read.get_mut(kind as usize) {
            r.count += 1;
            r.bytes += bytes;
            r.sum_ns += lat;
            if ret < 0 {
                r.errors += 1;
            }
            hist_add(&mut r.hist, lat);
        }
    }
    if let Some(p) = PROCS.get_ptr_mut(&t.tgid) {
        let p = unsafe { &mut *p };
        let k = kind as usize;
        if let Some(c) = p.read_count.get_mut(k) {
            atomic_add(c, 1);
        }
        if let Some(c) = p.read_bytes.get_mut(k) {
            atomic_add(c, bytes);
        }
        if let Some(c) = p.read_ns.get_mut(k) {
            atomic_add(c, lat);
        }
    }
    0
}

// ---------------------------------------------------------------------------------------------
// Block layer: every request on the machine, keyed by `struct request *`
// ---------------------------------------------------------------------------------------------

/// The `struct request *` argument as a plain number. Loaded from the context directly it is a
/// typed (trusted) pointer, which the verifier will not let us hash into an array slot.
#[inline(always)]
fn rq_arg(ctx: &BtfTracePointContext) -> u64 {
    unsafe { bpf_probe_read_kernel(ctx.as_ptr() as *const u64) }.unwrap_or(0)
}

#[inline(always)]
fn inflight_entry(rq: u64) -> Option<*mut Inflight> {
    let e = INFLIGHT.get_ptr_mut(inflight_slot(rq))?;
    let slot = unsafe { &mut *e };
    if slot.rq != rq {
        if slot.rq != 0 {
            drop_event(DROP_INFLIGHT_FULL);
        }
        *slot = Inflight {
            rq,
            ..Inflight::default()
        };
    }
    Some(e)
}

/// Submission of a request (`blk_account_io_start`, in the submitter's context): remember which
/// job process submitted it. Requests that a kernel thread starts on the job's behalf (blk-throttle
/// dispatch, writeback) are not attributed: without fentry (no BPF trampolines on this kernel)
/// there is no hook in the submitter's context before blk-throttle defers the bio.
#[btf_tracepoint(function = "block_io_start")]
pub fn block_io_start(ctx: BtfTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let role = tracked(tgid);
    if role == 0 {
        return 0;
    }
    let role = role - 1;
    let rq = rq_arg(&ctx);
    if let Some(e) = inflight_entry(rq) {
        let e = unsafe { &mut *e };
        e.submit_role = role + 1;
        e.submit_tgid = tgid;
    }
    0
}

#[btf_tracepoint(function = "block_rq_insert")]
pub fn block_rq_insert(ctx: BtfTracePointContext) -> i32 {
    let rq = rq_arg(&ctx);
    if let Some(e) = inflight_entry(rq) {
        let e = unsafe { &mut *e };
        e.insert_ns = now_ns();
        e.issue_ns = 0; // a requeued request is inserted again: restart both clocks
    }
    0
}

#[btf_tracepoint(function = "block_rq_issue")]
pub fn block_rq_issue(ctx: BtfTracePointContext) -> i32 {
    let rq = rq_arg(&ctx);
    if let Some(e) = inflight_entry(rq) {
        unsafe { (*e).issue_ns = now_ns() };
    }
    0
}

/// `block_rq_complete(rq, error, nr_bytes)`, from `blk_update_request`, before the request's
/// remaining length is updated: `nr_bytes < __data_len` is a partial completion.
#[btf_tracepoint(function = "block_rq_complete")]
pub fn block_rq_complete(ctx: BtfTracePointContext) -> i32 {
    let rq = rq_arg(&ctx);
    let error: u64 = ctx.arg(1);
    let nr_bytes: u64 = ctx.arg(2);
    let (error, nr_bytes) = (error & 0xff, nr_bytes & 0xffff_ffff);
    let now = now_ns();
    let o = config().offsets;

    let (Some(cmd_flags), Some(data_len), Some(q)) = (
        rd::<u32>(rq, o.rq_cmd_flags),
        rd::<u32>(rq, o.rq_data_len),
        rd::<u64>(rq, o.rq_q),
    ) else {
        drop_event(DROP_KERNEL_READ_FAILED);
        return 0;
    };
    let disk = rd::<u64>(q, o.queue_disk).unwrap_or(0);
    let major = rd::<i32>(disk, o.disk_major).unwrap_or(0) as u32;
    let minor = rd::<i32>(disk, o.disk_first_minor).unwrap_or(0) as u32;
    let dev = (major << 20) | (minor & 0xfffff);
    let op = match cmd_flags & 0xff {
        0 => OP_READ,
        1 => OP_WRITE,
        2 => OP_FLUSH,
        3 => OP_DISCARD,
        _ => OP_OTHER,
    };
    let done = nr_bytes >= data_len as u64;

    let key = BlockKey { dev, op };
    let stats = match BLOCK_STATS.get_ptr_mut(&key) {
        Some(s) => Some(s),
        None => {
            let Some(zero) = ZERO_BLOCK_STATS.get(0) else {
                return 0;
            };
            if BLOCK_STATS.insert(&key, zero, BPF_ANY as u64).is_err() {
                drop_event(DROP_BLOCK_STATS_FULL);
            }
            BLOCK_STATS.get_ptr_mut(&key)
        }
    };
    let Some(s) = stats else {
        return 0;
    };
    let s = unsafe { &mut *s };
    s.bytes += nr_bytes;
    if !done {
        return 0; // partial completion: bytes only; the request stays in flight
    }
    s.count += 1;
    if error != 0 {
        s.errors += 1;
    }
    let Some(slot) = INFLIGHT.get_ptr_mut(inflight_slot(rq)) else {
        return 0;
    };
    let slot = unsafe { &mut *slot };
    if slot.rq != rq {
        return 0; // issued before we attached (or its slot was taken): counted, no latency
    }
    let e = *slot;
    slot.rq = 0;
    if e.issue_ns != 0 && now >= e.issue_ns {
        let lat = now - e.issue_ns;
        s.lat_count += 1;
        s.lat_sum_ns += lat;
        hist_add(&mut s.lat_hist, lat);
        if e.insert_ns != 0 && e.issue_ns >= e.insert_ns {
            let qt = e.issue_ns - e.insert_ns;
            s.queue_count += 1;
            s.queue_sum_ns += qt;
            hist_add(&mut s.queue_hist, qt);
        }
    }
    if e.submit_role != 0 {
        let role = (e.submit_role - 1) as usize;
        if let Some(c) = s.job_count.get_mut(role) {
            *c += 1;
        }
        if let Some(c) = s.job_bytes.get_mut(role) {
            *c += nr_bytes;
        }
        if let Some(rs) = ROLE_STATS.get_ptr_mut(role as u32) {
            let rs = unsafe { &mut *rs };
            rs.blk_count += 1;
            rs.blk_bytes += nr_bytes;
        }
        if let Some(p) = PROCS.get_ptr_mut(&e.submit_tgid) {
            let p = unsafe { &mut *p };
            atomic_add(&mut p.blk_count, 1);
            atomic_add(&mut p.blk_bytes, nr_bytes);
        }
    }
    0
}
