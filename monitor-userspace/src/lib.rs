//! stallmon: why are our GPUs idle?
//!
//! The data flows through one module per stage:
//!
//! 1. kernel probes and their maps: [`kernel`] (programs in the `monitor-ebpf` crate, wire types
//!    in `monitor-common`);
//! 2. collectors: [`collector`] (maps -> cumulative snapshots, feeder state changes), [`gpu`]
//!    (NVML or the demo's simulated GPU);
//! 3. attribution: [`attribution`] (GPU idle seconds -> io / preprocess / host / other), wired by
//!    [`pipeline`];
//! 4. exporters: [`exporter`] (Prometheus `/metrics`), [`record`] (JSON lines), [`summary`]
//!    (exit summary), [`report`] / [`report_cmd`] (offline recomputation).
//!
//! [`trace`] runs the clock; [`job`], [`joblabel`], [`preflight`] and [`privileges`] deal with the
//! target process and the host.
pub mod attribution;
pub mod collector;
pub mod exporter;
pub mod gpu;
pub mod hist;
pub mod job;
pub mod joblabel;
pub mod kernel;
pub mod pipeline;
pub mod preflight;
pub mod privileges;
pub mod record;
pub mod report;
pub mod report_cmd;
pub mod summary;
pub mod trace;
