//! The GPU stage of the pipeline: sampler ([`crate::gpu`]) -> [`Attributor`] -> metrics, record
//! lines and the summary's verdicts. Live tracing and `stallmon report` share
//! [`attach_gpu_results`], so both print the same verdicts from the same numbers.
use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Result;
use monitor_common::{FD_FILE, NUM_STATES, ROLE_WORKER};

use crate::{
    attribution::{
        AttributionRecord, Attributor, AttributorConfig, CAUSE_NAMES, FeederRecord, GpuRecord,
        GpuTotals, VerdictContext, WorkerSlice, verdict,
    },
    collector::{Collector, Snapshot, monotonic_ns},
    exporter::GpuMetrics,
    gpu::{GpuReading, GpuSampler, job_gpus, nvml::NvmlSampler, simulated::SimulatedGpu},
    record::Recorder,
    summary::Summary,
    trace::TraceArgs,
};

pub struct GpuPipeline {
    sampler: Option<Box<dyn GpuSampler>>,
    disabled: Option<String>,
    attributor: Attributor,
    /// GPUs named with --gpus; else discovered from the job's compute contexts.
    named: Option<Vec<u32>>,
    selected: HashSet<u32>,
    latest: BTreeMap<u32, GpuReading>,
    last_workers: Option<(u64, [u64; NUM_STATES])>,
    feeder_tid: u32,
    feeder_seeded: bool,
    job_pids: HashSet<u32>,
    /// Sampled directories of the job's open regular files, with counts.
    dirs: HashMap<String, u64>,
    /// GPUs that failed at some point, with the last error.
    stale: BTreeMap<u32, String>,
}

impl GpuPipeline {
    pub fn start(args: &TraceArgs, feeder_tid: u32) -> Self {
        let (sampler, disabled): (Option<Box<dyn GpuSampler>>, _) = if args.no_gpu {
            (None, Some("GPU attribution disabled: --no-gpu".to_string()))
        } else if let Some(path) = &args.simulate_gpu {
            (Some(Box::new(SimulatedGpu::new(path.clone()))), None)
        } else {
            match NvmlSampler::new(args.gpus.clone()) {
                Ok(s) => (Some(Box::new(s)), None),
                Err(why) => (None, Some(why)),
            }
        };
        Self {
            sampler,
            disabled,
            attributor: Attributor::new(AttributorConfig::default()),
            named: args.gpus.clone(),
            selected: HashSet::new(),
            latest: BTreeMap::new(),
            last_workers: None,
            feeder_tid: args.feeder_tid.unwrap_or(feeder_tid),
            feeder_seeded: false,
            job_pids: HashSet::new(),
            dirs: HashMap::new(),
            stale: BTreeMap::new(),
        }
    }

    pub fn disabled_reason(&self) -> Option<&str> {
        self.disabled.as_deref()
    }

    pub fn source(&self) -> Option<&'static str> {
        self.sampler.as_ref().map(|s| s.source())
    }

    fn emit(&mut self, rec: AttributionRecord, recorder: Option<&mut Recorder>) -> Result<()> {
        if let Some(r) = recorder {
            r.line(&rec)?;
        }
        self.attributor.apply(&rec);
        Ok(())
    }

    /// Fine tick: the workers' state time since the last tick and the feeder's state changes.
    pub fn fine_tick(
        &mut self,
        collector: &mut Collector,
        mut recorder: Option<&mut Recorder>,
    ) -> Result<()> {
        if self.sampler.is_none() {
            return Ok(());
        }
        if !self.feeder_seeded {
            // The feeder's state at attach time, before any change arrives.
            let now = monotonic_ns();
            let state = collector
                .kernel()
                .threads
                .get(&self.feeder_tid, 0)
                .map(|t| t.state)
                .unwrap_or(monitor_common::STATE_ON_CPU);
            self.emit(
                AttributionRecord::Feeder(FeederRecord {
                    events: vec![(now, state)],
                    until_ns: Some(now),
                }),
                recorder.as_deref_mut(),
            )?;
            self.feeder_seeded = true;
        }
        let events = collector.drain_feeder();
        let (now, states) = collector.role_states()?;
        let workers = states[ROLE_WORKER as usize];
        let feeder = FeederRecord {
            events: events
                .iter()
                .filter(|e| e.tid == self.feeder_tid)
                .map(|e| (e.ts_ns, e.state))
                .collect(),
            until_ns: Some(now),
        };
        self.emit(AttributionRecord::Feeder(feeder), recorder.as_deref_mut())?;
        if let Some((t0, before)) = self.last_workers
            && now > t0
        {
            let slice = WorkerSlice {
                start_ns: t0,
                end_ns: now,
                state_ns: std::array::from_fn(|i| workers[i].saturating_sub(before[i])),
            };
            self.emit(AttributionRecord::WorkerSlice(slice), recorder)?;
        }
        self.last_workers = Some((now, workers));
        Ok(())
    }

    /// Interval tick: poll the GPUs, feed the job GPUs' samples to the attribution, and sample
    /// the job's open files for the verdict's "hottest path".
    pub fn interval_tick(
        &mut self,
        snap: &Snapshot,
        recorder: Option<&mut Recorder>,
    ) -> Result<()> {
        self.job_pids = snap
            .procs
            .values()
            .filter(|p| !p.exited)
            .map(|p| p.pid)
            .collect();
        let Some(sampler) = self.sampler.as_mut() else {
            return Ok(());
        };
        // Only for the verdict, so only when there is a GPU to give one.
        let readings = tokio::task::block_in_place(|| sampler.poll());
        self.sample_open_files();
        self.ingest(readings, recorder)
    }

    fn ingest(
        &mut self,
        readings: Vec<GpuReading>,
        mut recorder: Option<&mut Recorder>,
    ) -> Result<()> {
        let source = self.source().unwrap_or("nvml");
        if source == "simulated" {
            self.selected.extend(readings.iter().map(|r| r.info.index));
        } else if let Some(named) = &self.named {
            self.selected.extend(named.iter().copied());
        } else {
            self.selected.extend(job_gpus(&readings, &self.job_pids));
        }
        for r in readings {
            if let Some(why) = &r.stale
                && self.stale.insert(r.info.index, why.clone()).is_none()
            {
                eprintln!("stallmon: GPU {} is stale: {why}", r.info.index);
            }
            if self.selected.contains(&r.info.index) && !r.samples.is_empty() {
                let rec = GpuRecord::new(&r.info, source, &r.samples);
                self.emit(AttributionRecord::Gpu(rec), recorder.as_deref_mut())?;
            }
            self.latest.insert(r.info.index, r);
        }
        Ok(())
    }

    /// End of run: everything the sampler still holds, then attribute what remains.
    pub fn finish(&mut self, recorder: Option<&mut Recorder>) -> Result<()> {
        if let Some(sampler) = self.sampler.as_mut() {
            let readings = tokio::task::block_in_place(|| sampler.drain());
            self.ingest(readings, recorder)?;
        }
        self.attributor.flush();
        Ok(())
    }

    fn sample_open_files(&mut self) {
        for pid in &self.job_pids {
            let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                continue;
            };
            for fd in dir.flatten() {
                let Ok(target) = std::fs::read_link(fd.path()) else {
                    continue;
                };
                let t = target.to_string_lossy();
                if !t.starts_with('/')
                    || ["/dev/", "/proc/", "/sys/", "/usr/lib", "/lib"]
                        .iter()
                        .any(|p| t.starts_with(p))
                {
                    continue;
                }
                // Only files open for reading (the dataset), not logs or checkpoints being
                // written: the access mode in fdinfo's octal flags is O_RDONLY (0).
                let info = std::fs::read_to_string(format!(
                    "/proc/{pid}/fdinfo/{}",
                    fd.file_name().to_string_lossy()
                ))
                .unwrap_or_default();
                let read_only = info
                    .lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                    .is_some_and(|f| f & 3 == 0);
                if !read_only {
                    continue;
                }
                if let Some(parent) = target.parent() {
                    *self
                        .dirs
                        .entry(parent.to_string_lossy().into_owned())
                        .or_default() += 1;
                }
            }
        }
    }

    pub fn metrics(&self) -> Vec<GpuMetrics> {
        let totals: HashMap<u32, GpuTotals> = self
            .attributor
            .totals()
            .into_iter()
            .map(|t| (t.gpu, t))
            .collect();
        self.latest
            .values()
            .map(|r| {
                let t = totals.get(&r.info.index);
                GpuMetrics {
                    index: r.info.index,
                    uuid: r.info.uuid.clone(),
                    model: r.info.model.clone(),
                    utilization: r.samples.last().map(|s| s.util),
                    busy_s: t.map_or(0.0, |t| t.busy_s),
                    idle_s: t.map_or([0.0; 4], |t| t.idle_s),
                    memory_used_bytes: r.memory_used_bytes,
                    memory_total_bytes: r.memory_total_bytes,
                    temperature_c: r.temperature_c,
                    power_w: r.power_w,
                    pcie_rx_bytes: r.pcie_rx_bytes,
                    pcie_tx_bytes: r.pcie_tx_bytes,
                    throttle_reasons: r.throttle_reasons.clone(),
                    stale: r.stale.is_some(),
                }
            })
            .collect()
    }

    pub fn fill_summary(&self, summary: &mut Summary) {
        summary.hottest_path = self
            .dirs
            .iter()
            .max_by_key(|(d, n)| (**n, std::cmp::Reverse((*d).clone())))
            .map(|(d, _)| d.clone());
        if let Some(why) = &self.disabled {
            summary.gpu_disabled = Some(why.clone());
            return;
        }
        let labels: BTreeMap<u32, (String, String)> = self
            .latest
            .values()
            .map(|r| (r.info.index, (r.info.uuid.clone(), r.info.model.clone())))
            .collect();
        attach_gpu_results(
            summary,
            &self.attributor.totals(),
            &labels,
            self.source(),
            &self.stale,
        );
    }
}

/// Puts per-GPU attribution results and one verdict per GPU into the summary.
pub fn attach_gpu_results(
    summary: &mut Summary,
    totals: &[GpuTotals],
    labels: &BTreeMap<u32, (String, String)>,
    source: Option<&str>,
    stale: &BTreeMap<u32, String>,
) {
    let simulated = source == Some("simulated");
    let context = verdict_context(summary, simulated);
    summary.gpu.clear();
    summary.gpu_verdicts.clear();
    for t in totals {
        let (uuid, model) = labels.get(&t.gpu).cloned().unwrap_or_default();
        let idle: serde_json::Map<String, serde_json::Value> = CAUSE_NAMES
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), serde_json::json!(t.idle_s[i])))
            .collect();
        summary.gpu.push(serde_json::json!({
            "gpu": t.gpu,
            "uuid": uuid,
            "model": model,
            "source": source,
            "simulated": simulated,
            "wall_seconds": t.wall_s,
            "busy_seconds": t.busy_s,
            "idle_seconds": idle,
            "idle_total_seconds": t.idle_total_s(),
            "samples": t.samples,
            "stale": stale.get(&t.gpu),
        }));
        let mut line = verdict(t, &context);
        if let Some(why) = stale.get(&t.gpu) {
            line.push_str(&format!(
                " [GPU went stale during the run: {why}; figures cover only the samples received]"
            ));
        }
        summary.gpu_verdicts.push(line);
    }
    if totals.is_empty() && source.is_some() {
        let what = if simulated { "simulated GPU" } else { "GPU" };
        summary
            .gpu_verdicts
            .push(format!("no {what} samples for the job's GPUs (no GPU context held by the job? name them with --gpus)"));
    }
}

/// Where the job's reads went: the device with most job bytes, the p99 of the file reads of the
/// role that read most, and the hottest directory.
pub fn verdict_context(summary: &Summary, simulated: bool) -> VerdictContext {
    // The device the job's own requests went to; when none were attributed (I/O started by a
    // kernel thread on the job's behalf, e.g. blk-throttle dispatch), the busiest read device.
    let reads = || summary.block.iter().filter(|b| b.op == "read");
    let read_device = reads()
        .max_by_key(|b| b.job_bytes.iter().sum::<u64>())
        .filter(|b| b.job_bytes.iter().sum::<u64>() > 0)
        .or_else(|| reads().filter(|b| b.bytes > 0).max_by_key(|b| b.bytes))
        .map(|b| b.device.clone());
    let file = monitor_common::FD_KIND_NAMES[FD_FILE as usize];
    let read_p99_s = summary
        .reads
        .iter()
        .filter(|r| r.fd_kind == file)
        .max_by_key(|r| r.bytes)
        .and_then(|r| r.latency.p99_seconds);
    VerdictContext {
        simulated,
        read_device,
        read_p99_s,
        hottest_path: summary.hottest_path.clone(),
    }
}
