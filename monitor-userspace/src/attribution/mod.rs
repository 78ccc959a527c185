//! Attribution of GPU idle time to its causes, per rank: each rank (a slot's current occupant)
//! has its own [`engine::Attributor`], fed only with its own feeder's state changes, its own
//! workers' slices and the samples of the GPUs it drives.
//!
//! The engines are fed through record lines ([`Attribution::apply`]): the live daemon builds
//! each line, writes it to the record file and applies it; `stallmon report` applies the same
//! lines read back. Same calls in the same order, same totals.
pub mod engine;
pub mod feed;

use std::collections::BTreeMap;

pub use engine::{
    Attributor, AttributorConfig, CAUSE_HOST, CAUSE_IO, CAUSE_NAMES, CAUSE_OTHER, CAUSE_PREPROCESS,
    GpuTotals, NUM_CAUSES, WorkerSlice,
};

use crate::{gpu::UtilSample, schema::record::Line};

/// What identifies a GPU in the results.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuIdentity {
    pub uuid: String,
    pub model: String,
    pub pci_bus_id: String,
    pub source: Option<String>,
}

/// Attributed time of one GPU while it belonged to one rank.
#[derive(Clone, Debug, PartialEq)]
pub struct RankGpuTotals {
    pub job: u32,
    pub rank: String,
    pub slot: u32,
    pub identity: GpuIdentity,
    pub totals: GpuTotals,
}

struct RankEngine {
    job: u32,
    rank: String,
    engine: Attributor,
    gpus: BTreeMap<u32, GpuIdentity>,
}

impl RankEngine {
    fn totals(&self, slot: u32) -> Vec<RankGpuTotals> {
        self.engine
            .totals()
            .into_iter()
            .map(|totals| RankGpuTotals {
                job: self.job,
                rank: self.rank.clone(),
                slot,
                identity: self.gpus.get(&totals.gpu).cloned().unwrap_or_default(),
                totals,
            })
            .collect()
    }
}

/// Every rank's engine.
pub struct Attribution {
    config: AttributorConfig,
    live: BTreeMap<u32, RankEngine>,
    finished: Vec<RankGpuTotals>,
}

impl Attribution {
    pub fn new(config: AttributorConfig) -> Self {
        Self {
            config,
            live: BTreeMap::new(),
            finished: Vec::new(),
        }
    }

    fn engine(&mut self, slot: u32) -> &mut RankEngine {
        let config = self.config;
        self.live.entry(slot).or_insert_with(|| RankEngine {
            job: 0,
            rank: String::new(),
            engine: Attributor::new(config),
            gpus: BTreeMap::new(),
        })
    }

    /// Applies one record line; lines that carry no attribution input are ignored.
    pub fn apply(&mut self, line: &Line) {
        match line {
            Line::Rank(r) => {
                let same = self
                    .live
                    .get(&r.slot)
                    .is_some_and(|e| e.job == r.job && e.rank == r.rank);
                if !same {
                    self.retire(r.slot);
                    let e = self.engine(r.slot);
                    e.job = r.job;
                    e.rank = r.rank.clone();
                }
            }
            Line::Feeder(f) => {
                let e = &mut self.engine(f.slot).engine;
                for &(ts, state) in &f.events {
                    e.push_feeder_event(ts, state);
                }
                if let Some(until) = f.until_ns {
                    e.feeder_complete_until(until);
                }
            }
            Line::WorkerSlice(w) => self.engine(w.slot).engine.push_worker_slice(WorkerSlice {
                start_ns: w.start_ns,
                end_ns: w.end_ns,
                state_ns: w.state_ns,
            }),
            Line::Gpu(g) => {
                let e = self.engine(g.slot);
                e.gpus.insert(
                    g.gpu,
                    GpuIdentity {
                        uuid: g.uuid.clone(),
                        model: g.model.clone(),
                        pci_bus_id: g.pci_bus_id.clone(),
                        source: g.source.clone(),
                    },
                );
                let samples: Vec<UtilSample> = g
                    .samples
                    .iter()
                    .map(|&(end_ns, period_ns, util)| UtilSample {
                        end_ns,
                        period_ns,
                        util,
                    })
                    .collect();
                e.engine.push_gpu_samples(g.gpu, &samples);
            }
            _ => {}
        }
    }

    /// A rank's slot is taken by another rank, or the run ends: what is queued is attributed
    /// with the data there is, and its totals are kept.
    fn retire(&mut self, slot: u32) {
        if let Some(mut e) = self.live.remove(&slot) {
            e.engine.flush();
            self.finished.extend(e.totals(slot));
        }
    }

    /// End of the run: everything queued is attributed.
    pub fn flush(&mut self) {
        for e in self.live.values_mut() {
            e.engine.flush();
        }
    }

    /// Totals of every rank and GPU so far (finished ranks first).
    pub fn totals(&self) -> Vec<RankGpuTotals> {
        let mut out = self.finished.clone();
        for (&slot, e) in &self.live {
            out.extend(e.totals(slot));
        }
        out
    }

    /// Drops what is kept of a forgotten job.
    pub fn forget_job(&mut self, job: u32) {
        self.finished.retain(|t| t.job != job);
        let slots: Vec<u32> = self
            .live
            .iter()
            .filter(|(_, e)| e.job == job)
            .map(|(s, _)| *s)
            .collect();
        for s in slots {
            self.live.remove(&s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::record::{FeederInfo, FeederLine, GpuLine, RankLine, WorkerSliceLine};
    use monitor_common::{STATE_IPC_WAIT, STATE_ON_CPU, STATE_STORAGE_WAIT};

    const MS: u64 = 1_000_000;

    fn rank(slot: u32, job: u32, rank: &str) -> Line {
        Line::Rank(RankLine {
            slot,
            job,
            rank: rank.into(),
            local_rank: None,
            feeder: FeederInfo {
                pid: 1,
                tid: 1,
                comm: "python".into(),
                gpus: vec![],
                why: "test".into(),
            },
        })
    }

    fn feed(a: &mut Attribution, slot: u32, state: u32, workers: [u64; 5], gpu: u32) {
        a.apply(&Line::Feeder(FeederLine {
            slot,
            events: vec![(0, state)],
            until_ns: Some(100 * MS),
        }));
        a.apply(&Line::WorkerSlice(WorkerSliceLine {
            slot,
            start_ns: 0,
            end_ns: 100 * MS,
            state_ns: workers.map(|v| v * MS),
        }));
        a.apply(&Line::Gpu(GpuLine {
            gpu,
            uuid: format!("GPU-{gpu}"),
            slot,
            samples: vec![(100 * MS, 100 * MS, 0.0)],
            ..GpuLine::default()
        }));
    }

    #[test]
    fn each_gpu_is_explained_by_its_own_rank() {
        let mut a = Attribution::new(AttributorConfig::default());
        a.apply(&rank(0, 1, "0"));
        a.apply(&rank(1, 1, "1"));
        // Rank 0 waits for workers that read; rank 1 for workers that compute.
        feed(&mut a, 0, STATE_IPC_WAIT, [0, 100, 0, 0, 0], 0);
        feed(&mut a, 1, STATE_IPC_WAIT, [100, 0, 0, 0, 0], 1);
        a.flush();
        let t = a.totals();
        assert_eq!(t.len(), 2);
        let (g0, g1) = (&t[0], &t[1]);
        assert_eq!((g0.rank.as_str(), g0.totals.gpu), ("0", 0));
        assert!((g0.totals.idle_s[CAUSE_IO] - 0.1).abs() < 1e-9, "{g0:?}");
        assert_eq!(g0.identity.uuid, "GPU-0");
        assert_eq!((g1.rank.as_str(), g1.totals.gpu), ("1", 1));
        assert!(
            (g1.totals.idle_s[CAUSE_PREPROCESS] - 0.1).abs() < 1e-9,
            "{g1:?}"
        );
    }

    #[test]
    fn a_new_rank_in_a_slot_keeps_the_old_totals() {
        let mut a = Attribution::new(AttributorConfig::default());
        a.apply(&rank(0, 1, "0"));
        feed(&mut a, 0, STATE_STORAGE_WAIT, [0; 5], 0);
        // The same rank again (a feeder change) keeps the engine.
        a.apply(&rank(0, 1, "0"));
        assert_eq!(a.totals().len(), 1);
        // Another job takes the slot: the first job's totals are kept, finished.
        a.apply(&rank(0, 2, "0"));
        a.apply(&Line::Feeder(FeederLine {
            slot: 0,
            events: vec![(200 * MS, STATE_ON_CPU)],
            until_ns: Some(300 * MS),
        }));
        let t = a.totals();
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(t[0].job, 1);
        assert!((t[0].totals.idle_s[CAUSE_IO] - 0.1).abs() < 1e-9);
        a.forget_job(1);
        assert!(a.totals().is_empty());
    }
}
