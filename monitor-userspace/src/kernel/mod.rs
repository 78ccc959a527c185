//! The kernel side as user space sees it: BTF offsets, loading and attaching the programs, and
//! the typed maps they fill.
pub mod loader;
pub mod offsets;

pub use loader::{Kernel, TRACEPOINTS};
