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
        *c = c.wrapping_add(dn);
    }
    if dsum != 0
        && let Some(c) = o.since_sum.get_mut(s)
    {
        *c = c.wrapping_add(dsum);
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
        t.flushed_ns = now;
        open_enter(index_of(value), STATE_ON_CPU, now);
    }
    Some(t)
}

/// Adds the time since `t.since_ns` to the thread's current state, then restarts the clock.
#[inline(always)]
pub fn close(t: &mut TaskState, now: u64) {
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
    if let Some(v) = t.pending_state_ns.get_mut(st) {
        *v += dt;
    }
}

/// Adds the thread's pending process counters to its process's entry when `PROC_FLUSH_NS`
/// has passed since the last time (or always, with `force`: the thread exits).
#[inline(always)]
pub fn flush_proc(t: &mut TaskState, now: u64, force: bool) {
    if !force && now.saturating_sub(t.flushed_ns) < PROC_FLUSH_NS {
        return;
    }
    t.flushed_ns = now;
    let Some(p) = proc_entry(t.tgid) else {
        t.pending_state_ns = [0; NUM_STATES];
        t.pending_stall_count = [0; NUM_FD_KINDS];
        t.pending_stall_ns = [0; NUM_FD_KINDS];
        return;
    };
    let p = unsafe { &mut *p };
    for i in 0..NUM_STATES {
        let v = t.pending_state_ns[i];
        if v != 0 {
            atomic_add(&mut p.state_ns[i], v);
            t.pending_state_ns[i] = 0;
        }
    }
    for i in 0..NUM_FD_KINDS {
        let c = t.pending_stall_count[i];
        if c != 0 {
            atomic_add(&mut p.stall_count[i], c);
            atomic_add(&mut p.stall_ns[i], t.pending_stall_ns[i]);
            t.pending_stall_count[i] = 0;
            t.pending_stall_ns[i] = 0;
        }
    }
}

/// Moves the thread to the accounting of `value` (user space changed its process's role or
/// rank): its time so far stays with the old one.
#[inline(always)]
pub fn migrate(t: &mut TaskState, value: u32, now: u64) {
    if t.tracked == value {
        return;
    }
    close(t, now);
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
pub fn end_stall(t: &mut TaskState, now: u64) {
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
    if let Some(c) = t.pending_stall_count.get_mut(kind as usize) {
        *c += 1;
    }
    if let Some(c) = t.pending_stall_ns.get_mut(kind as usize) {
        *c += dt;
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
