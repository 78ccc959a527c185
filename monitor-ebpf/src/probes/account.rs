//! Thread-state bookkeeping shared by the probes: each accounted thread (a feeder's or a
//! worker's) is in one state at a time; the time since its last change is added to its slot's
//! per-CPU totals and its process's counters when the state changes, and the open-interval
//! counters let user space read the time spent so far without walking threads.
use monitor_common::*;

use super::maps::*;

/// Shared counters take atomic adds (threads of one process run on several CPUs at once).
/// `AtomicU64::fetch_add` is not offered on BPF (no CAS on older CPUs), but XADD is.
#[inline(always)]
pub fn atomic_add(slot: &mut u64, v: u64) {
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            slot, v,
        )
    };
}

#[inline(always)]
pub fn hist_add(hist: &mut [u64; HIST_SLOTS], ns: u64) {
    if let Some(h) = hist.get_mut(hist_slot(ns)) {
        *h += 1;
    }
}

/// The per-slot index of an accounted `TRACKED` value.
#[inline(always)]
pub fn index_of(value: u32) -> u32 {
    let (slot, role) = tracked_parts(value);
    slot_index(slot, role)
}

/// Adds `dn` threads and `dsum` ns (both wrapping, so "minus" works) to the open counters of
/// `(idx, state)`.
#[inline(always)]
fn open_move(idx: u32, state: u32, dn: u64, dsum: u64) {
    let Some(o) = OPEN.get_ptr_mut(idx) else {
        drop_event(DROP_SLOT_OUT_OF_RANGE);
        return;
    };
    let o = unsafe { &mut *o };
    let s = state as usize;
    if dn != 0
        && let Some(c) = o.count.get_mut(s)
    {
        atomic_add(c, dn);
    }
    if dsum != 0
        && let Some(c) = o.since_sum.get_mut(s)
    {
        atomic_add(c, dsum);
    }
}

/// A thread enters or leaves the open counters of `(idx, state)` at `now` (its `since_ns`).
#[inline(always)]
pub fn open_enter(idx: u32, state: u32, now: u64) {
    open_move(idx, state, 1, now);
}

#[inline(always)]
pub fn open_leave(idx: u32, state: u32, now: u64) {
    open_move(idx, state, 1u64.wrapping_neg(), now.wrapping_neg());
}

/// The state entry of `task` (a BTF task pointer). With `create`, a thread seen for the first
/// time gets one (on CPU since `now`) under `value`, which must be an accounted role.
#[inline(always)]
pub fn task_state(
    task: *const u8,
    tgid: u32,
    value: u32,
    now: u64,
    create: bool,
) -> Option<&'static mut TaskState> {
    let Some(t) = TASKS.get(task, create) else {
        if create {
            drop_event(DROP_TASK_STORAGE_FAILED);
        }
        return None;
    };
    let t = unsafe { &mut *t };
    if t.tracked == 0 {
        if !create {
            return None;
        }
        // Fresh (zeroed) entry: a valid TRACKED value is never 0.
        t.tracked = value;
        t.tgid = tgid;
        t.state = STATE_ON_CPU;
        t.since_ns = now;
        t.read_kind = READ_NONE;
        open_enter(index_of(value), STATE_ON_CPU, now);
    }
    Some(t)
}

/// Adds the time since `t.since_ns` to the thread's current state, then restarts the clock.
#[inline(always)]
pub fn close(t: &mut TaskState, now: u64, proc_: Option<*mut ProcInfo>) {
    let dt = now.saturating_sub(t.since_ns);
    t.since_ns = now;
    let st = t.state as usize;
    if dt == 0 || st >= NUM_STATES || !accounted(t.tracked) {
        return;
    }
    let idx = index_of(t.tracked);
    if let Some(s) = SLOT_STATS.get_ptr_mut(idx) {
        let s = unsafe { &mut *s };
        if let Some(v) = s.state_ns.get_mut(st) {
            *v += dt;
        }
    }
    open_move(idx, t.state, 0, dt);
    if let Some(p) = proc_ {
        let p = unsafe { &mut *p };
        if let Some(v) = p.state_ns.get_mut(st) {
            atomic_add(v, dt);
        }
    }
}

/// Moves the thread to the accounting of `value` (user space changed its process's role or
/// rank): its time so far stays with the old one.
#[inline(always)]
pub fn migrate(t: &mut TaskState, value: u32, now: u64, proc_: Option<*mut ProcInfo>) {
    if t.tracked == value {
        return;
    }
    close(t, now, proc_);
    if accounted(t.tracked) {
        open_leave(index_of(t.tracked), t.state, now);
    }
    if accounted(value) {
        open_enter(index_of(value), t.state, now);
    }
    t.tracked = value;
}

/// Whether `tid` is the feeder thread of `slot` (default: the feeder process's main thread).
#[inline(always)]
pub fn is_feeder_thread(slot: u32, tid: u32, tgid: u32) -> bool {
    let chosen = match SLOT_CONF.get(slot) {
        Some(c) if c.feeder_tid != 0 => c.feeder_tid,
        _ => tgid,
    };
    tid == chosen
}

/// Moves the thread to `state` at `now` (its interval was just closed, so `since_ns == now`).
/// A feeder thread's change goes to user space for attribution.
#[inline(always)]
pub fn set_state(t: &mut TaskState, tid: u32, state: u32, now: u64) {
    if t.state == state || !accounted(t.tracked) {
        t.state = state;
        return;
    }
    let idx = index_of(t.tracked);
    open_leave(idx, t.state, now);
    open_enter(idx, state, now);
    t.state = state;
    let (slot, role) = tracked_parts(t.tracked);
    if role == ROLE_FEEDER && is_feeder_thread(slot, tid, t.tgid) {
        emit(&Event {
            ts_ns: now,
            kind: EVENT_FEEDER_STATE,
            slot,
            tgid: t.tgid,
            tid,
            state,
            _pad: 0,
        });
    }
}

/// The thread wakes from a sleep inside a read-family call: one read stall.
#[inline(always)]
pub fn end_stall(t: &mut TaskState, now: u64, proc_: Option<*mut ProcInfo>) {
    if t.stall_kind == 0 {
        return;
    }
    let kind = t.stall_kind - 1;
    t.stall_kind = 0;
    if kind as usize >= NUM_FD_KINDS || !accounted(t.tracked) {
        return;
    }
    let dt = now.saturating_sub(t.since_ns);
    let i = index_of(t.tracked) * NUM_FD_KINDS as u32 + kind;
    if let Some(s) = STALLS.get_ptr_mut(i) {
        let s = unsafe { &mut *s };
        atomic_add(&mut s.count, 1);
        atomic_add(&mut s.sum_ns, dt);
        if let Some(h) = s.hist.get_mut(hist_slot(dt)) {
            atomic_add(h, 1);
        }
    }
    if let Some(p) = proc_ {
        let p = unsafe { &mut *p };
        if let Some(c) = p.stall_count.get_mut(kind as usize) {
            atomic_add(c, 1);
        }
        if let Some(c) = p.stall_ns.get_mut(kind as usize) {
            atomic_add(c, dt);
        }
    }
}

/// The process entry of `tgid`, counted when missing.
#[inline(always)]
pub fn proc_entry(tgid: u32) -> Option<*mut ProcInfo> {
    let p = PROCS.get_ptr_mut(&tgid);
    if p.is_none() {
        drop_event(DROP_PROC_ENTRY_MISSING);
    }
    p
}
