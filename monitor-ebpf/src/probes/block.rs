//! Block layer: every request on the machine. A request's issue time waits in a direct-mapped
//! slot keyed by its `struct request *`; at completion one per-CPU array entry per (device,
//! operation) takes counts, bytes and the latency and queue-time histograms. Queue time runs from
//! the block layer's own `request.start_time_ns` (set at allocation) to issue, so no probe is
//! needed at insertion.
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

#[inline(always)]
fn inflight_entry(rq: u64) -> Option<&'static mut Inflight> {
    let e = unsafe { &mut *INFLIGHT.get_ptr_mut(inflight_slot(rq))? };
    if e.rq != rq {
        if e.rq != 0 {
            drop_event(DROP_INFLIGHT_FULL);
        }
        *e = Inflight {
            rq,
            ..Inflight::default()
        };
    }
    Some(e)
}

/// Submission (`blk_account_io_start`, in the submitter's context): which job process submitted
/// the request. Requests a kernel thread starts on the job's behalf (blk-throttle dispatch,
/// writeback) are not attributed: without fentry there is no hook in the submitter's context
/// before blk-throttle defers the bio.
#[btf_tracepoint(function = "block_io_start")]
pub fn block_io_start(ctx: BtfTracePointContext) -> i32 {
    let value = tracked(current_tgid());
    if value == 0 {
        return 0;
    }
    if let Some(e) = inflight_entry(rq_key(&ctx)) {
        e.submitter = value;
    }
    0
}

#[inline(always)]
fn current_tgid() -> u32 {
    (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32
}

#[btf_tracepoint(function = "block_rq_issue")]
pub fn block_rq_issue(ctx: BtfTracePointContext) -> i32 {
    if let Some(e) = inflight_entry(rq_key(&ctx)) {
        e.issue_ns = unsafe { bpf_ktime_get_ns() };
    }
    0
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
    let q: *const u8 = field(rq, kcfg!(rq_q));
    if q.is_null() {
        drop_event(DROP_KERNEL_READ_FAILED);
        return 0;
    }
    let disk: *const u8 = field(q, kcfg!(queue_disk));
    let dev = if disk.is_null() {
        0
    } else {
        let major: i32 = field(disk, kcfg!(disk_major));
        let minor: i32 = field(disk, kcfg!(disk_first_minor));
        mkdev(major as u32, minor as u32)
    };
    let Some(ds) = device_slot(dev) else {
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
    let key = rq_key(&ctx);
    let Some(e) = INFLIGHT.get_ptr_mut(inflight_slot(key)) else {
        return 0;
    };
    let e = unsafe { &mut *e };
    if e.rq != key {
        return 0; // issued before we attached (or its slot was taken): counted, no latency
    }
    let Inflight {
        issue_ns,
        submitter,
        ..
    } = *e;
    e.rq = 0;
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
    if submitter != 0 {
        let (slot, role) = tracked_parts(submitter);
        if let Some(c) = s.job_count.get_mut(role as usize) {
            *c += 1;
        }
        if let Some(c) = s.job_bytes.get_mut(role as usize) {
            *c += nr_bytes;
        }
        if role != ROLE_LAUNCHER
            && let Some(st) = SLOT_STATS.get_ptr_mut(slot_index(slot, role))
        {
            let st = unsafe { &mut *st };
            st.blk_count += 1;
            st.blk_bytes += nr_bytes;
        }
    }
    0
}
