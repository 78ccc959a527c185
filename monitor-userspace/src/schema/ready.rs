//! `--ready-file`: written (atomically, mode 0600) once stallmon traces, so that scripts,
//! tests and benchmarks wait for a file instead of parsing log lines.
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    /// stallmon's own PID.
    pub pid: u32,
    /// The address the metrics endpoint listens on (the real port when `:0` was asked for).
    pub listen: String,
    /// `trace` or `node`.
    pub mode: String,
    /// The traced PID (`trace`), 0 for `node`.
    pub target_pid: u32,
    /// Whether the syscall programs are attached (`--syscalls`).
    pub syscalls: bool,
}
