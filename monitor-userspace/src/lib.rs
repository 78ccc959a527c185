//! stallmon: why are our GPUs idle?
//!
//! Data flows through one module per stage:
//! kernel probes ([`kernel`]) -> maps -> [`collector`] -> [`attribution`] -> exporters
//! ([`exporter`], [`record`], [`summary`]).
pub mod kernel;
