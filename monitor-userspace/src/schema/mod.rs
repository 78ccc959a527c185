//! Every file format stallmon writes or reads, as one typed serde schema each, written and read
//! through the same types:
//!
//! * [`record`]: the `--record` JSON-lines file (`stallmon report` reads it back);
//! * [`summary`]: the exit summary (`--json`, and the record's last line);
//! * [`ready`]: the `--ready-file` document, the machine-readable "tracing now" signal.
pub mod ready;
pub mod record;
pub mod summary;

use serde::{Deserialize, Serialize};

/// A job's identity, in separate, bounded labels (every value sanitized, see
/// `discover::identity`). Empty strings are absent labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JobLabels {
    /// `--job-name`, else the elastic run id, else a name derived from the job.
    pub job_name: String,
    /// Kubernetes pod name (pod-resources API) or, without it, the pod UID from the cgroup.
    #[serde(default)]
    pub pod: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub container: String,
    /// SLURM job id.
    #[serde(default)]
    pub hpc_job: String,
}

/// Sparse log2 histogram: `(slot, count)` pairs of the non-empty slots, with the sum of the
/// values in ns (see `monitor_common::HIST_SLOTS`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SparseHist {
    pub count: u64,
    pub sum_ns: u64,
    #[serde(default)]
    pub slots: Vec<(u8, u64)>,
}

impl SparseHist {
    pub fn from_counts(counts: &[u64], sum_ns: u64) -> Self {
        let slots: Vec<(u8, u64)> = counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c != 0)
            .map(|(i, c)| (i as u8, *c))
            .collect();
        Self {
            count: slots.iter().map(|(_, c)| c).sum(),
            sum_ns,
            slots,
        }
    }
}
