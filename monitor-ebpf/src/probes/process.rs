//! The jobs' process trees, followed live: a tracked process's child is tracked (a feeder's
//! children become its rank's workers; a worker's or launcher's children keep their parent's
//! role, and a launcher's new child is told to user space), new threads get a state entry,
//! exits close the books.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::{bpf_get_current_task_btf, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use monitor_common::*;

use super::{
    access::{field, task_ids},
    account::*,
    maps::*,
};

const EEXIST: i32 = -17;

#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    let parent: *const u8 = ctx.arg(0);
    let child: *const u8 = ctx.arg(1);
    let (tgid, _) = task_ids(parent);
    let value = tracked(tgid);
    if value == 0 {
        return 0;
    }
    let (child_tgid, _) = task_ids(child);
    let now = unsafe { bpf_ktime_get_ns() };
    let child_value = if child_tgid == tgid {
        value // a new thread of a tracked process
    } else {
        let (slot, role) = tracked_parts(value);
        let v = if role == ROLE_FEEDER {
            tracked_value(slot, ROLE_WORKER)
        } else {
            value
        };
        let info = ProcInfo {
            tracked: v,
            parent_tgid: tgid,
            start_ns: field(child, kcfg!(task_start_time)),
            ..ProcInfo::default()
        };
        match PROCS.insert(&child_tgid, &info, BPF_NOEXIST as u64) {
            Ok(()) => {}
            Err(EEXIST) => {
                // The PID came back while the entry of its previous, exited owner was still
                // waiting for user space: that process's last counters are lost (counted).
                if let Some(old) = PROCS.get_ptr(&child_tgid)
                    && unsafe { (*old).exited } != 0
                {
                    drop_event(DROP_EXITED_OVERWRITTEN);
                    let _ = PROCS.insert(&child_tgid, &info, BPF_ANY as u64);
                }
            }
            Err(_) => {
                drop_event(DROP_PROCS_FULL);
                return 0;
            }
        }
        set_tracked(child_tgid, v);
        if role == ROLE_LAUNCHER {
            // User space gives the child its role now, before it forks workers of its own.
            emit(&Event {
                ts_ns: now,
                kind: EVENT_FORK,
                slot,
                tgid: child_tgid,
                tid: tgid,
                state: 0,
                _pad: 0,
            });
        }
        v
    };
    if accounted(child_value) {
        // Runnable, not yet run: waiting for a CPU.
        if let Some(t) = task_state(child, child_tgid, child_value, now, true) {
            let (_, tid) = task_ids(child);
            set_state(t, tid, STATE_CPU_WAIT, now);
        }
    }
    0
}

/// `sched_process_exec(p, old_pid, bprm)`: counts execs and tells user space (a launcher that
/// execs may have become a rank's process: its new environment names the rank).
#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    let task: *const u8 = ctx.arg(0);
    let (tgid, tid) = task_ids(task);
    let value = tracked(tgid);
    if value == 0 {
        return 0;
    }
    if let Some(p) = PROCS.get_ptr_mut(&tgid) {
        atomic_add_u32(unsafe { &mut (*p).execs });
    }
    let (slot, _) = tracked_parts(value);
    emit(&Event {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        kind: EVENT_EXEC,
        slot,
        tgid,
        tid,
        state: 0,
        _pad: 0,
    });
    0
}

#[inline(always)]
fn atomic_add_u32(v: &mut u32) {
    *v = v.wrapping_add(1);
}

/// `sched_process_exit`: the exiting task is current. Its thread's books are closed and its I/O
/// accounting added to its process's; when it is the last thread (`signal->live` reached 0), the
/// process is marked exited and user space is told.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(_ctx: BtfTracePointContext) -> i32 {
    let task = unsafe { bpf_get_current_task_btf() } as *const u8;
    let (tgid, tid) = task_ids(task);
    let value = tracked(tgid);
    if value == 0 {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(t) = task_state(task, tgid, value, now, false)
        && t.exited == 0
    {
        migrate(t, value, now);
        close(t, now);
        flush_proc(t, now, true);
        if accounted(t.tracked) {
            open_leave(index_of(t.tracked), t.state, now);
            let (slot, role) = tracked_parts(t.tracked);
            if role == ROLE_FEEDER && is_feeder_thread(slot, tid, tgid) {
                // The feeder is gone: its last state must not run on until user space notices.
                emit(&Event {
                    ts_ns: now,
                    kind: EVENT_FEEDER_STATE,
                    slot,
                    tgid,
                    tid,
                    state: STATE_EXITED,
                    _pad: 0,
                });
            }
        }
        t.exited = 1;
    }
    let p = PROCS.get_ptr_mut(&tgid);
    // This thread's own I/O accounting joins its process's (user space adds the live threads').
    if let Some(p) = p
        && kcfg!(has_ioac) != 0
    {
        let p = unsafe { &mut *p };
        let ioac = kcfg!(task_ioac);
        atomic_add(&mut p.io_rchar, field(task, ioac + kcfg!(ioac_rchar)));
        atomic_add(&mut p.io_syscr, field(task, ioac + kcfg!(ioac_syscr)));
        atomic_add(
            &mut p.io_read_bytes,
            field(task, ioac + kcfg!(ioac_read_bytes)),
        );
    }
    let signal: *const u8 = field(task, kcfg!(task_signal));
    if signal.is_null() {
        return 0;
    }
    let live: i32 = field(signal, kcfg!(signal_live));
    if live != 0 {
        return 0;
    }
    if let Some(p) = p {
        unsafe { (*p).exited = 1 };
    }
    set_tracked(tgid, 0);
    let (slot, _) = tracked_parts(value);
    emit(&Event {
        ts_ns: now,
        kind: EVENT_EXIT,
        slot,
        tgid,
        tid,
        state: 0,
        _pad: 0,
    });
    0
}
