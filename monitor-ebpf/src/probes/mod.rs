//! The kernel programs, one module per probe family:
//!
//! * [`sched`]: `sched_switch`, where each tracked thread's time is split into states and a
//!   blocked thread's wait is classified from its saved syscall registers;
//! * [`process`]: fork / exec / exit, following each job's process tree live;
//! * [`block`]: every block request on the machine, keyed in flight by its `struct request *`;
//! * [`syscalls`]: exact per-call read latency (`--syscalls` only: any syscall tracepoint slows
//!   every syscall of every task, so the default mode attaches none).
//!
//! [`maps`] holds every map and the configuration, [`access`] the typed (BTF) reads of kernel
//! structs, [`account`] the thread-state bookkeeping shared by the probes.
pub mod access;
pub mod account;
pub mod block;
pub mod maps;
pub mod process;
pub mod sched;
pub mod syscalls;
