//! `--syscalls` only: exact latency and bytes of every read-family call of the jobs, by fd kind,
//! from the raw syscall tracepoints (as BTF tracepoints: no perf record is built, and every other
//! syscall leaves after one compare). Any syscall tracepoint puts every syscall of every task on
//! the kernel's slow path, which is why the default mode attaches none of this.
use aya_ebpf::{
    helpers::generated::{bpf_get_current_task_btf, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use monitor_common::{abi, *};

use super::{
    access::{fd_kind, field, task_ids},
    account::*,
    maps::*,
};

/// `sys_enter(regs, id)`.
#[btf_tracepoint(function = "sys_enter")]
pub fn sys_enter(ctx: BtfTracePointContext) -> i32 {
    let id: u64 = ctx.arg(1);
    if !abi::is_read_family(id) {
        return 0;
    }
    let task = unsafe { bpf_get_current_task_btf() } as *const u8;
    let (tgid, _) = task_ids(task);
    let value = tracked(tgid);
    if !accounted(value) {
        return 0;
    }
    let regs: *const u8 = ctx.arg(0);
    let kind = fd_kind(task, field(regs, kcfg!(regs_di)));
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(t) = task_state(task, tgid, value, now, true) {
        t.read_kind = kind;
        t.read_start_ns = now;
    }
    0
}

/// `sys_exit(regs, ret)`: closes the read in progress of a tracked thread.
#[btf_tracepoint(function = "sys_exit")]
pub fn sys_exit(ctx: BtfTracePointContext) -> i32 {
    let task = unsafe { bpf_get_current_task_btf() } as *const u8;
    let (tgid, _) = task_ids(task);
    let value = tracked(tgid);
    if !accounted(value) {
        return 0;
    }
    let Some(t) = task_state(task, tgid, value, 0, false) else {
        return 0;
    };
    let kind = t.read_kind;
    if kind as usize >= NUM_FD_KINDS || !accounted(t.tracked) {
        return 0;
    }
    t.read_kind = READ_NONE;
    let ret: i64 = ctx.arg(1);
    let lat = unsafe { bpf_ktime_get_ns() }.saturating_sub(t.read_start_ns);
    let bytes = if ret > 0 { ret as u64 } else { 0 };
    let i = index_of(t.tracked) * NUM_FD_KINDS as u32 + kind;
    if let Some(r) = READS.get_ptr_mut(i) {
        let r = unsafe { &mut *r };
        r.count += 1;
        r.bytes += bytes;
        r.sum_ns += lat;
        if ret < 0 {
            r.errors += 1;
        }
        hist_add(&mut r.hist, lat);
    }
    if let Some(p) = PROCS.get_ptr_mut(&tgid) {
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
