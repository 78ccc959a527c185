//! `sched_switch`: where tracked threads' time is split into states. Runs on every context
//! switch of the machine: an untracked task costs one typed read and one inlined array load; a
//! tracked one its task storage, no process lookup (see `flush_proc`).
use aya_ebpf::{
    helpers::generated::{bpf_ktime_get_ns, bpf_task_pt_regs},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use monitor_common::{abi, *};

use super::{
    access::{fd_kind, field, in_iowait, task_ids},
    account::*,
    maps::*,
};

/// Why a thread that goes off CPU waits, and the fd kind + 1 of the read call it sleeps in (0 if
/// none). A thread blocked in a syscall has the syscall number and arguments in its saved user
/// registers; one that entered through an exception (an mmap page fault) has an error code
/// there instead, but sleeps in io_schedule, which is checked first.
#[inline(always)]
fn off_cpu(t: &TaskState, task: *const u8, preempt: bool, prev_state: u32) -> (u32, u32) {
    if preempt || prev_state == abi::TASK_RUNNING {
        // Still runnable (preempted or yielded): waiting for a CPU, not for data.
        return (STATE_CPU_WAIT, 0);
    }
    let iowait = in_iowait(task);
    let regs = unsafe { bpf_task_pt_regs(task as *mut _) } as *const u8;
    if regs.is_null() {
        return (
            if iowait {
                STATE_STORAGE_WAIT
            } else {
                STATE_OTHER_WAIT
            },
            0,
        );
    }
    // orig_ax holds the syscall number only inside a syscall, which is also when ax holds
    // -ENOSYS (the return value replaces it at exit); an exception, such as a page fault waiting
    // on a lock, leaves its error code in orig_ax, which can look like a syscall (7 = poll).
    let ax: u64 = field(regs, kcfg!(regs_ax));
    if ax != abi::ENOSYS_RET {
        return (
            if iowait {
                STATE_STORAGE_WAIT
            } else {
                STATE_OTHER_WAIT
            },
            0,
        );
    }
    let nr: u64 = field(regs, kcfg!(regs_orig_ax));
    if abi::is_read_family(nr) {
        let kind = if t.read_kind != READ_NONE {
            t.read_kind // --syscalls: known since sys_enter
        } else if iowait {
            FD_FILE // sleeping in io_schedule inside a read: a file or block device
        } else {
            fd_kind(task, field(regs, kcfg!(regs_di)))
        };
        let state = match kind {
            FD_FILE => STATE_STORAGE_WAIT,
            FD_IPC => STATE_IPC_WAIT,
            _ if iowait => STATE_STORAGE_WAIT,
            _ => STATE_OTHER_WAIT,
        };
        return (state, kind + 1);
    }
    if iowait {
        (STATE_STORAGE_WAIT, 0)
    } else if abi::is_ipc_wait(nr) {
        (STATE_IPC_WAIT, 0)
    } else {
        (STATE_OTHER_WAIT, 0)
    }
}

/// A launcher's thread that still carries accounting from an earlier role leaves it.
#[inline(always)]
fn retire(task: *const u8, tgid: u32, value: u32, now: u64) {
    if let Some(t) = task_state(task, tgid, value, now, false)
        && t.exited == 0
    {
        migrate(t, value, now);
        flush_proc(t, now, false);
    }
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let prev_state: u64 = ctx.arg(3);
    // The clock is read only when a tracked task is involved.
    let mut now = 0;

    let (tgid, tid) = task_ids(prev);
    let value = tracked(tgid);
    if value != 0 {
        now = unsafe { bpf_ktime_get_ns() };
        if !accounted(value) {
            retire(prev, tgid, value, now);
        } else if let Some(t) = task_state(prev, tgid, value, now, true)
            && t.exited == 0
        {
            migrate(t, value, now);
            close(t, now);
            let (state, stall) = off_cpu(t, prev, preempt & 1 != 0, prev_state as u32);
            t.stall_kind = stall;
            set_state(t, tid, state, now);
            flush_proc(t, now, false);
        }
    }

    let (tgid, tid) = task_ids(next);
    let value = tracked(tgid);
    if value != 0 {
        if now == 0 {
            now = unsafe { bpf_ktime_get_ns() };
        }
        if !accounted(value) {
            retire(next, tgid, value, now);
        } else if let Some(t) = task_state(next, tgid, value, now, false)
            && t.exited == 0
        {
            migrate(t, value, now);
            end_stall(t, now);
            close(t, now);
            set_state(t, tid, STATE_ON_CPU, now);
            flush_proc(t, now, false);
        }
    }
    0
}
