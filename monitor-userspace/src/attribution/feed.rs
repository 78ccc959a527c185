//! The attribution's inputs, as record lines: per fine tick, each rank's feeder state changes
//! (from the kernel's events) and its workers' state time since the previous tick; per GPU poll,
//! each GPU's new samples, for the rank that holds it.
use std::collections::BTreeMap;

use monitor_common::{EVENT_FEEDER_STATE, Event, NUM_STATES};

use crate::{
    gpu::GpuReading,
    schema::record::{FeederLine, GpuLine, Line, WorkerSliceLine},
};

/// Remembers each slot's last worker reading.
#[derive(Default)]
pub struct Feed {
    last_workers: BTreeMap<u32, (u64, [u64; NUM_STATES])>,
}

impl Feed {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lines for one fine tick: feeder changes of every active slot (every slot gets a line, so
    /// that its watermark advances), then worker slices.
    pub fn fine(
        &mut self,
        now: u64,
        events: &[Event],
        workers: &BTreeMap<u32, [u64; NUM_STATES]>,
    ) -> Vec<Line> {
        let mut feeder: BTreeMap<u32, Vec<(u64, u32)>> =
            workers.keys().map(|&s| (s, Vec::new())).collect();
        for e in events.iter().filter(|e| e.kind == EVENT_FEEDER_STATE) {
            feeder.entry(e.slot).or_default().push((e.ts_ns, e.state));
        }
        let mut out: Vec<Line> = feeder
            .into_iter()
            .map(|(slot, events)| {
                Line::Feeder(FeederLine {
                    slot,
                    events,
                    until_ns: Some(now),
                })
            })
            .collect();
        for (&slot, state) in workers {
            if let Some((t0, before)) = self.last_workers.get(&slot)
                && now > *t0
            {
                out.push(Line::WorkerSlice(WorkerSliceLine {
                    slot,
                    start_ns: *t0,
                    end_ns: now,
                    state_ns: std::array::from_fn(|i| state[i].saturating_sub(before[i])),
                }));
            }
            self.last_workers.insert(slot, (now, *state));
        }
        self.last_workers.retain(|s, _| workers.contains_key(s));
        out
    }

    /// Lines for one GPU poll: each GPU's samples go to the slot `owner` names; GPUs nobody
    /// holds are sampled (for the gauges) but not attributed. A GPU that went stale says so.
    pub fn gpus(
        &mut self,
        readings: &[GpuReading],
        owner: &dyn Fn(u32) -> Option<u32>,
        source: &str,
    ) -> Vec<Line> {
        readings
            .iter()
            .filter_map(|r| {
                let slot = owner(r.info.index)?;
                if r.samples.is_empty() && r.stale.is_none() {
                    return None;
                }
                Some(Line::Gpu(GpuLine {
                    gpu: r.info.index,
                    uuid: r.info.uuid.clone(),
                    model: r.info.model.clone(),
                    pci_bus_id: r.info.pci_bus_id.clone(),
                    source: Some(source.to_string()),
                    slot,
                    samples: r
                        .samples
                        .iter()
                        .map(|s| (s.end_ns, s.period_ns, s.util))
                        .collect(),
                    stale: r.stale.clone(),
                }))
            })
            .collect()
    }
}
