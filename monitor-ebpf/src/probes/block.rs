//! Block layer: every request on the machine. At completion one per-CPU array entry per
//! (device, operation) takes counts, bytes and the latency and queue-time histograms. The issue
//! time is the block layer's own `request.io_start_time_ns` where it keeps one (requests with
//! `RQF_STATS`: devices with writeback throttling or other block statistics users, the common
//! case); elsewhere it waits in a direct-mapped slot keyed by the `struct request *`, written at
//! issue. Queue time runs from `request.start_time_ns` (set at allocation) to issue, so no
//! probe is needed at insertion. Job processes' requests are counted at submission.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_probe_read_kernel, generated::bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use monitor_common::*;

use super::{access::field, account::hist_add, maps::*};

/// The `struct request *` argument as a number, to hash. Loaded from the context directly it is
/// a typed pointer, which the verifier will not let us hash; one untyped read gives the number.
#[inline(always)]
fn rq_key(ctx: &BtfTracePointContext) -> u64 {
    unsafe { bpf_probe_read_kernel(ctx.as_ptr() as *const u64) }.unwrap_or(0)
}

/// The device number of a typed `struct request *` (0 when it has no disk).
#[inline(always)]
fn device_of(rq: *const u8) -> Option<u32> {
    let q: *const u8 = field(rq, kcfg!(rq_q));
    if q.is_null() {
        drop_event(DROP_KERNEL_READ_FAILED);
        return None;
    }
    let disk: *const u8 = field(q, kcfg!(queue_disk));
    if disk.is_null() {
        return Some(0);
    }
    let major: i32 = field(disk, kcfg!(disk_major));
    let minor: i32 = field(disk, kcfg!(disk_first_minor));
    Some(mkdev(major as u32, minor as u32))
}

/// The device slot of `dev` (claimed on first sight), by linear probing.
#[inline(always)]
fn device_slot(dev: u32) -> Option<u32> {
    let first = dev_slot(dev);
    for i in 0..DEV_PROBES {
        let s = (first + i) & (MAX_DEVS - 1);
        let d = unsafe { &mut *BLOCK_DEVS.get_ptr_mut(s)? };
        if *d == dev {
            return Some(s);
        }
        if *d == 0 {
            *d = dev;
            return Some(s);
        }
    }
    drop_event(DROP_BLOCK_DEVICES_FULL);
    None
}

#[inline(always)]
fn op_of(cmd_flags: u32) -> u32 {
    let op = cmd_flags & kcfg!(req_op_mask);
    if op == kcfg!(req_op_read) {
        OP_READ
    } else if op == kcfg!(req_op_write) {
        OP_WRITE
    } else if op == kcfg!(req_op_flush) {
        OP_FLUSH
    } else if op == kcfg!(req_op_discard) {
        OP_DISCARD
    } else {
        OP_OTHER
    }
}

/// Submission (`blk_account_io_start`, in the submitter's context): a job process's request is
/// counted for its role and rank here, with its full size. Requests a kernel thread starts on
/// the job's behalf (blk-throttle dispatch, writeback) are not attributed: without fentry there
/// is no hook in the submitter's context before blk-throttle defers the bio.
#[btf_tracepoint(function = "block_io_start")]
pub fn block_io_start(ctx: BtfTracePointContext) -> i32 {
    let value = tracked(current_tgid());
    if value == 0 {
        return 0;
    }
    let rq: *const u8 = ctx.arg(0);
    let cmd_flags: u32 = field(rq, kcfg!(rq_cmd_flags));
    let bytes = field::<u32>(rq, kcfg!(rq_data_len)) as u64;
    let Some(ds) = device_of(rq).and_then(device_slot) else {
        return 0;
    };
    let (slot, role) = tracked_parts(value);
    if let Some(s) = BLOCK_STATS.get_ptr_mut(ds * NUM_OPS as u32 + op_of(cmd_flags)) {
        let s = unsafe { &mut *s };
        if let Some(c) = s.job_count.get_mut(role as usize) {
            *c += 1;
        }
        if let Some(c) = s.job_bytes.get_mut(role as usize) {
            *c += bytes;
        }
    }
    if role != ROLE_LAUNCHER
        && let Some(st) = SLOT_STATS.get_ptr_mut(slot_index(slot, role))
    {
        let st = unsafe { &mut *st };
        st.blk_count += 1;
        st.blk_bytes += bytes;
    }
    0
}

#[inline(always)]
fn current_tgid() -> u32 {
    (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32
}

/// An `INFLIGHT` entry older than this is a leftover (a request completed while its device
/// was timed by the kernel), not a live request: overwriting it is no collision.
const INFLIGHT_STALE_NS: u64 = 60_000_000_000;

/// Issue. Where the block layer times the request itself (`RQF_STATS`, known per device from
/// its last completion) there is nothing to do; otherwise the issue time waits in `INFLIGHT`.
#[btf_tracepoint(function = "block_rq_issue")]
pub fn block_rq_issue(ctx: BtfTracePointContext) -> i32 {
    let rq: *const u8 = ctx.arg(0);
    let op = field::<u32>(rq, kcfg!(rq_cmd_flags)) & kcfg!(req_op_mask);
    let passthrough = op == kcfg!(req_op_drv_in) || op == kcfg!(req_op_drv_out);
    if !passthrough
        && let Some(dev) = device_of(rq)
        && device_timed(dev)
    {
        return 0;
    }
    let key = rq_key(&ctx);
    let Some(e) = INFLIGHT.get_ptr_mut(inflight_slot(key)) else {
        return 0;
    };
    let e = unsafe { &mut *e };
    let now = unsafe { bpf_ktime_get_ns() };
    if e.rq != 0 && e.rq != key && now.saturating_sub(e.issue_ns) < INFLIGHT_STALE_NS {
        drop_event(DROP_INFLIGHT_FULL);
    }
    e.rq = key;
    e.issue_ns = now;
    0
}

/// Whether `dev`'s last completed request carried the kernel's issue time (its slot is only
/// looked up: issue does not claim device slots).
#[inline(always)]
fn device_timed(dev: u32) -> bool {
    let first = dev_slot(dev);
    for i in 0..DEV_PROBES {
        let s = (first + i) & (MAX_DEVS - 1);
        match BLOCK_DEVS.get(s) {
            Some(d) if *d == dev => return DEV_TIMED.get(s).is_some_and(|t| *t != 0),
            Some(0) | None => return false,
            Some(_) => {}
        }
    }
    false
}

/// Notes whether device slot `ds` times its requests (written only on change: the entry is
/// read on every issue, from every CPU).
#[inline(always)]
fn set_device_timed(ds: u32, timed: bool) {
    if let Some(t) = DEV_TIMED.get_ptr_mut(ds) {
        let t = unsafe { &mut *t };
        if (*t != 0) != timed {
            *t = timed as u32;
        }
    }
}

/// `block_rq_complete(rq, error, nr_bytes)`, from `blk_update_request`, before the request's
/// remaining length is updated: `nr_bytes < __data_len` is a partial completion.
#[btf_tracepoint(function = "block_rq_complete")]
pub fn block_rq_complete(ctx: BtfTracePointContext) -> i32 {
    let rq: *const u8 = ctx.arg(0);
    let error: u64 = ctx.arg(1);
    let nr_bytes: u64 = ctx.arg(2);
    let (error, nr_bytes) = (error & 0xff, nr_bytes & 0xffff_ffff);
    let now = unsafe { bpf_ktime_get_ns() };

    let cmd_flags: u32 = field(rq, kcfg!(rq_cmd_flags));
    let data_len: u32 = field(rq, kcfg!(rq_data_len));
    let Some(ds) = device_of(rq).and_then(device_slot) else {
        return 0;
    };
    let Some(s) = BLOCK_STATS.get_ptr_mut(ds * NUM_OPS as u32 + op_of(cmd_flags)) else {
        return 0;
    };
    let s = unsafe { &mut *s };
    s.bytes += nr_bytes;
    if nr_bytes < data_len as u64 {
        return 0; // partial completion: bytes only; the request stays in flight
    }
    s.count += 1;
    if error != 0 {
        s.errors += 1;
    }
    // The issue time: the block layer's own when it took one, else ours from INFLIGHT. Only a
    // data request says whether the device is stamped: a driver passthrough request never is,
    // and an empty flush may be completed without ever being started.
    let timed =
        kcfg!(rqf_stats) != 0 && field::<u32>(rq, kcfg!(rq_rq_flags)) & kcfg!(rqf_stats) != 0;
    let op = cmd_flags & kcfg!(req_op_mask);
    if data_len != 0 && op != kcfg!(req_op_drv_in) && op != kcfg!(req_op_drv_out) {
        set_device_timed(ds, timed);
    }
    let issue_ns = if timed {
        field::<u64>(rq, kcfg!(rq_io_start_time_ns))
    } else {
        let key = rq_key(&ctx);
        let Some(e) = INFLIGHT.get_ptr_mut(inflight_slot(key)) else {
            return 0;
        };
        let e = unsafe { &mut *e };
        if e.rq != key {
            return 0; // issued before we attached (or its slot was taken): counted, no latency
        }
        e.rq = 0;
        e.issue_ns
    };
    if issue_ns != 0 && now >= issue_ns {
        let lat = now - issue_ns;
        s.lat_count += 1;
        s.lat_sum_ns += lat;
        hist_add(&mut s.lat_hist, lat);
        let start: u64 = field(rq, kcfg!(rq_start_time_ns));
        if start != 0 && issue_ns >= start {
            let qt = issue_ns - start;
            s.queue_count += 1;
            s.queue_sum_ns += qt;
            hist_add(&mut s.queue_hist, qt);
        }
    }
    0
}
