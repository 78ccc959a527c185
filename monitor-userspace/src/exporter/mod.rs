//! Exporters: Prometheus `/metrics` ([`metrics`], served by [`http`]), the record file and the
//! exit summary live in `crate::record` and `crate::summary`.
pub mod http;
pub mod metrics;

pub use metrics::{GpuMetrics, MetricsState, SharedState};
