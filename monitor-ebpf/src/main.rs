//! stallmon's kernel programs.
//!
//! Three families of probes, all feeding fixed-size maps that user space reads on its own clock:
//!
//! * block layer (`tp_btf/block_*`): every request on the machine, keyed in flight by its
//!   `struct request *`, giving per-device, per-operation latency and queue-time histograms;
//! * the job (`tp_btf/sched_process_fork`, `sched_process_exit`, `sched_process_exec`): the target
//!   process and every process it forks, followed live;
//! * the job's threads (`tp_btf/sched_switch`, `syscalls/sys_{enter,exit}_*read*`): read-syscall
//!   latency and bytes by role and fd kind, and the time each thread spends in each state.
//!
//! Rules: untracked tasks leave after one map lookup; no per-event ring-buffer traffic except the
//! feeder thread's state changes (one thread); every failed insert is counted in `DROPS`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod probes;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // The kernel programs only exist for the BPF target; this keeps host builds of the workspace
    // (clippy, tests) working.
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
