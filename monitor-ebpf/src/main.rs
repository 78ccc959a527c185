//! stallmon's kernel programs (built for `bpfel-unknown-none` only; see `probes`).
//!
//! Three families of probes, all feeding fixed-size maps that user space reads on its own clock:
//! the block layer (every request on the machine: latency and queue-time histograms per device
//! and operation), the jobs' process trees (fork/exec/exit, followed live), and the jobs' threads
//! (`sched_switch`: the time each thread spends in each state, and why a blocked thread waits,
//! read from its saved syscall registers). `--syscalls` adds exact per-call read latency.
//!
//! Rules: untracked tasks leave after one inlined array load; nothing per I/O or per syscall goes
//! through a ring buffer (only feeder threads' state changes and job processes' exec/exit); every
//! failed insert, collision or failed read is counted in `DROPS`.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod probes;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
