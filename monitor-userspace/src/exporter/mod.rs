//! Exporters: Prometheus `/metrics` and `/healthz` ([`metrics`], served by [`http`]). The record
//! file and the exit summary live in `crate::record` and `crate::summary`.
pub mod http;
pub mod metrics;
