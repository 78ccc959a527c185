//! One tracing session, for `trace` and `node` alike: the clock that drives every stage.
//!
//! kernel maps → collector (snapshots, worker states) → discovery (jobs, roles) → attribution
//! (per rank) → record lines → ledger → exporters (`/metrics`, the record file, the summary).
//! Two clocks: a fine tick (100 ms) for the attribution inputs and discovery of new processes,
//! and the user's `--interval` for GPU polls, full snapshots and everything exported.
use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use monitor_common::{EVENT_FEEDER_STATE, Event};

use crate::{
    attribution::{Attribution, AttributorConfig, feed::Feed},
    collector::Collector,
    discover::{Change, Jobs, identity::PodRef, node::NodeDiscovery, procfs},
    exporter::{
        http::Health,
        metrics::{AttributedView, GpuView, JobView, SharedView, View},
    },
    gpu::{self, GpuReading, Polled, Sampler},
    interval::{Deltas, sample_open_files},
    kernel::Kernel,
    ledger::Ledger,
    record::Recorder,
    schema::{
        JobLabels,
        record::{Header, JobEndLine, JobLine, Line, RankLine, VERSION},
        summary::Summary,
    },
    summary::{self, Context},
};

pub const FINE_TICK: Duration = Duration::from_millis(100);
/// Processes of a job kept after they exit (their totals are in the ledger either way).
const EXITED_KEPT: usize = 256;
/// How long an interval waits for the driver's answer (a poll of 8 GPUs takes milliseconds).
const GPU_WAIT: Duration = Duration::from_millis(500);
/// A driver silent this long makes every GPU stale.
const GPU_HUNG: Duration = Duration::from_secs(10);

/// What the session needs besides its stages.
pub struct Settings {
    /// `trace` or `node`.
    pub mode: &'static str,
    pub interval: Duration,
    pub syscalls: bool,
    /// GPUs named with `--gpus`: attributed to a single rank even without a context.
    pub gpus_named: bool,
    /// `--pod-resources-socket` (node mode).
    pub pod_resources: Option<PathBuf>,
    /// Attribute a GPU's samples from the start of the session once the job takes it (trace
    /// mode: the job's whole life, start-up included). Node mode attributes from the moment a
    /// job holds the GPU.
    pub backfill: bool,
    pub hostname: String,
}

/// The stages of a session.
pub struct Session {
    settings: Settings,
    kernel: Kernel,
    collector: Collector,
    pub jobs: Jobs,
    node: Option<NodeDiscovery>,
    sampler: Option<Sampler>,
    gpu_disabled: Option<String>,
    feed: Feed,
    attribution: Attribution,
    ledger: Ledger,
    deltas: Deltas,
    recorder: Option<Recorder>,
    view: SharedView,
    health: Arc<Health>,
    latest: BTreeMap<u32, GpuReading>,
    holders: Vec<(u32, u32)>,
    /// Which slot's rank each GPU belongs to: kept until another rank takes it or its job ends.
    owners: BTreeMap<u32, u32>,
    /// Readings of GPUs nobody holds yet (trace mode), bounded.
    backlog: BTreeMap<u32, Vec<GpuReading>>,
    pods: HashMap<String, PodRef>,
    /// When the kubelet was last asked, and whether it answered.
    pods_at: Option<(Instant, bool)>,
    /// GPU holders (gpu, pid) the kubelet has already been asked about.
    pods_asked: std::collections::HashSet<(u32, u32)>,
    announced_jobs: std::collections::BTreeSet<u32>,
    kernel_processes: u64,
    /// Whether the block issue probe is attached (see `Kernel::sync_issue_probe`), and whether
    /// changing that failed once (said once).
    issue_probe: bool,
    issue_probe_failed: bool,
    /// The state each new feeder thread was in when it was chosen, for the next fine tick.
    first_states: Vec<Event>,
}

/// Everything a session is built from.
pub struct Parts {
    pub settings: Settings,
    pub kernel: Kernel,
    pub jobs: Jobs,
    pub node: Option<NodeDiscovery>,
    pub sampler: Result<Sampler, String>,
    pub recorder: Option<Recorder>,
    pub view: SharedView,
    pub health: Arc<Health>,
}

impl Session {
    pub fn new(p: Parts) -> Self {
        let (sampler, gpu_disabled) = match p.sampler {
            Ok(s) => (Some(s), None),
            Err(why) => (None, Some(why)),
        };
        let mut s = Self {
            settings: p.settings,
            kernel: p.kernel,
            collector: Collector::new(),
            jobs: p.jobs,
            node: p.node,
            sampler,
            gpu_disabled,
            feed: Feed::new(),
            attribution: Attribution::new(AttributorConfig::default()),
            ledger: Ledger::new(),
            deltas: Deltas::new(),
            recorder: p.recorder,
            view: p.view,
            health: p.health,
            latest: BTreeMap::new(),
            holders: Vec::new(),
            owners: BTreeMap::new(),
            backlog: BTreeMap::new(),
            pods: HashMap::new(),
            pods_at: None,
            pods_asked: Default::default(),
            announced_jobs: Default::default(),
            kernel_processes: 0,
            issue_probe: true,
            issue_probe_failed: false,
            first_states: Vec::new(),
        };
        let header = Line::Header(Header {
            version: VERSION,
            stallmon: env!("CARGO_PKG_VERSION").into(),
            revision: env!("STALLMON_REVISION").into(),
            mode: s.settings.mode.into(),
            start_mono_ns: crate::gpu::monotonic_ns(),
            interval_s: s.settings.interval.as_secs_f64(),
            gpu_source: s.gpu_source().map(str::to_string),
            syscalls: s.settings.syscalls,
        });
        s.emit(header);
        s.health.set_attached(true);
        s
    }

    pub fn gpu_source(&self) -> Option<&'static str> {
        self.sampler.as_ref().map(|s| s.source())
    }

    /// Writes a line to the record (if any), then feeds it to the attribution and the ledger:
    /// live and offline go through the same lines.
    fn emit(&mut self, line: Line) {
        if let Some(r) = &mut self.recorder {
            r.line(&line);
        }
        self.attribution.apply(&line);
        self.ledger.apply(&line);
    }

    fn announce_jobs(&mut self) {
        let new: Vec<(u32, JobLabels, u32, Vec<String>)> = self
            .jobs
            .iter()
            .filter(|j| !self.announced_jobs.contains(&j.id))
            .map(|j| (j.id, j.labels.clone(), j.root, j.command.clone()))
            .collect();
        for (job, labels, root_pid, command) in new {
            self.announced_jobs.insert(job);
            self.emit(Line::Job(JobLine {
                job,
                labels,
                root_pid,
                command,
            }));
        }
    }

    fn apply_changes(&mut self, changes: Vec<Change>) {
        self.announce_jobs();
        for c in changes {
            match c {
                Change::Feeder { job, rank, slot } => {
                    let Some(j) = self.jobs.get(job) else {
                        continue;
                    };
                    let Some(r) = j.ranks.get(&rank) else {
                        continue;
                    };
                    let Some(f) = r.feeder.clone() else { continue };
                    // The kernel reports a feeder's state changes only: a thread chosen while
                    // it sleeps (in the pipe read of its first batch, say) says what it waits
                    // for now, or that time would be unknown (other) until it wakes. Its
                    // changes after `ts_ns` follow from the kernel, in order.
                    let earlier = r.history.iter().rev().nth(1);
                    if earlier.is_none_or(|e| (e.pid, e.tid) != (f.pid, f.tid)) {
                        let ts_ns = gpu::monotonic_ns();
                        if let Some(state) = procfs::thread_state(f.pid, f.tid) {
                            self.first_states.push(Event {
                                ts_ns,
                                kind: EVENT_FEEDER_STATE,
                                slot,
                                tgid: f.pid,
                                tid: f.tid,
                                state,
                                _pad: 0,
                            });
                        }
                    }
                    tracing::info!(
                        job = %j.labels.job_name,
                        rank = %rank,
                        pid = f.pid,
                        comm = %f.comm,
                        gpus = ?f.gpus,
                        "feeder: {}",
                        f.why
                    );
                    let line = Line::Rank(RankLine {
                        slot,
                        job,
                        rank,
                        local_rank: r.local_rank,
                        feeder: f,
                    });
                    self.emit(line);
                }
                Change::Relabeled(job) => {
                    if let Some(j) = self.jobs.get(job) {
                        tracing::info!(job = %j.labels.job_name, hpc_job = %j.labels.hpc_job, "job named by its ranks' environment");
                        let line = Line::Job(JobLine {
                            job,
                            labels: j.labels.clone(),
                            root_pid: j.root,
                            command: j.command.clone(),
                        });
                        if self.announced_jobs.contains(&job) {
                            self.emit(line);
                        }
                    }
                }
                Change::Ended(job) => {
                    if let Some(j) = self.jobs.get(job) {
                        tracing::info!(job = %j.labels.job_name, "job ended: every process exited");
                    }
                    self.emit(Line::JobEnd(JobEndLine {
                        job,
                        exit_status: None,
                    }));
                }
                Change::Forgotten(job) => {
                    self.attribution.forget_job(job);
                    self.ledger.forget_job(job);
                    self.announced_jobs.remove(&job);
                }
                Change::NoSlot { .. } => {}
            }
        }
    }

    /// The fine tick: new processes' roles, feeder state changes, worker slices.
    pub fn fine_tick(&mut self) {
        let mut events = self.kernel.drain_events();
        let _ = self.jobs.observe(&events, None); // no full pass: nothing vanished
        let changes = self.jobs.reassign(&mut self.kernel, &self.holders, false);
        self.apply_changes(changes);
        if self.sampler.is_none() {
            self.first_states.clear();
            return;
        }
        if !self.first_states.is_empty() {
            events.append(&mut self.first_states);
            events.sort_by_key(|e| e.ts_ns);
        }
        let slots: Vec<u32> = self.jobs.slots().into_iter().map(|(s, _, _)| s).collect();
        match self.collector.worker_states(&self.kernel, &slots) {
            Ok((now, workers)) => {
                for line in self.feed.fine(now, &events, &workers) {
                    self.emit(line);
                }
            }
            Err(e) => tracing::warn!("reading worker states: {e}"),
        }
    }

    /// Updates which rank holds each GPU: the rank whose feeder holds a context on it; a GPU
    /// keeps its rank after the feeder is gone (the rank's last moments are its own) until
    /// another rank takes it or the rank's job ends.
    fn update_owners(&mut self) {
        let mut live_slots = std::collections::BTreeSet::new();
        for j in self.jobs.iter().filter(|j| j.ended.is_none()) {
            for r in j.ranks.values() {
                live_slots.insert(r.slot);
                for &g in r.feeder.iter().flat_map(|f| &f.gpus) {
                    self.owners.insert(g, r.slot);
                }
            }
        }
        if self.settings.mode == "node" {
            self.owners.retain(|_, slot| live_slots.contains(slot));
        }
        // GPUs named on the command line, nobody holding a context (NVML cannot see processes
        // of other PID namespaces): they belong to the only rank there is.
        if self.settings.gpus_named && self.owners.is_empty() {
            let slots = self.jobs.slots();
            if let [(slot, _, _)] = slots.as_slice() {
                for &g in self.latest.keys() {
                    self.owners.insert(g, *slot);
                }
            }
        }
    }

    /// The latest reading of a GPU, keeping the last samples when a poll brought none.
    fn remember(&mut self, r: &GpuReading) {
        let mut r = r.clone();
        if r.samples.is_empty()
            && let Some(old) = self.latest.get(&r.info.index)
        {
            r.samples = old.samples.last().copied().into_iter().collect();
        }
        self.latest.insert(r.info.index, r);
    }

    /// Feeds GPU readings to their ranks' attribution.
    fn emit_gpus(&mut self, readings: Vec<GpuReading>) {
        let Some(source) = self.gpu_source() else {
            return;
        };
        self.update_owners();
        let mut batch = Vec::new();
        for r in readings {
            let g = r.info.index;
            if self.owners.contains_key(&g) {
                batch.extend(self.backlog.remove(&g).unwrap_or_default());
                batch.push(r);
            } else if self.settings.backfill {
                let q = self.backlog.entry(g).or_default();
                q.push(r);
                if q.len() > 600 {
                    q.remove(0);
                }
            }
        }
        let owners = self.owners.clone();
        for line in self.feed.gpus(&batch, &|g| owners.get(&g).copied(), source) {
            self.emit(line);
        }
    }

    /// Asks the kubelet which pod holds which GPU: every 30 s, and at once when a process on a
    /// GPU the last answer did not place is about to become a job (a new pod: its labels are
    /// fixed when it is found). A kubelet that failed is left alone for 30 s.
    fn refresh_pods(&mut self, now: Instant, new_holder: bool) {
        let Some(sock) = &self.settings.pod_resources else {
            return;
        };
        if let Some((at, answered)) = self.pods_at
            && now.duration_since(at) < Duration::from_secs(30)
            && !(answered && new_holder)
        {
            return;
        }
        if !sock.exists() {
            // Not a Kubernetes node (or not mounted yet): look again later, quietly.
            self.pods_at = Some((now, true));
            self.pods.clear();
            return;
        }
        self.pods_at = Some((now, false));
        match crate::podresources::list_gpu_owners_blocking(sock, Duration::from_secs(2)) {
            Ok(owners) => {
                self.pods_at = Some((now, true));
                self.pods = owners
                    .into_iter()
                    .filter_map(|(dev, pods)| {
                        let p = pods.into_iter().next()?;
                        Some((
                            dev,
                            PodRef {
                                pod: p.pod,
                                namespace: p.namespace,
                                container: p.container,
                            },
                        ))
                    })
                    .collect();
            }
            Err(e) => {
                tracing::warn!("pod-resources: {e}; jobs found now carry no pod labels")
            }
        }
    }

    /// This interval's GPU readings. The driver answers on its own thread: when it has not
    /// answered within a moment, the figures go on without it (the GPUs' holders stay as they
    /// were), and a driver silent for [`GPU_HUNG`] makes every GPU stale.
    fn poll_gpus(&mut self) -> Vec<GpuReading> {
        let Some(sampler) = self.sampler.as_mut() else {
            return Vec::new();
        };
        // Blocking waits, off the async executor's hands.
        match tokio::task::block_in_place(|| sampler.poll(GPU_WAIT)) {
            Polled::Readings(readings) => {
                self.holders = readings
                    .iter()
                    .flat_map(|r| r.process_pids.iter().map(|&p| (r.info.index, p)))
                    .collect();
                readings
            }
            Polled::Waiting(for_) if for_ >= GPU_HUNG => self
                .latest
                .values()
                .map(|old| {
                    let mut r = GpuReading::empty(old.info.clone());
                    r.stale = Some(format!(
                        "NVML has not answered for {:.0} s",
                        for_.as_secs_f64()
                    ));
                    r
                })
                .collect(),
            Polled::Waiting(_) => Vec::new(),
        }
    }

    /// The interval tick: GPU poll, new jobs (node mode), roles, a full snapshot, the interval
    /// line, the exported view.
    pub fn interval_tick(&mut self) {
        let now = Instant::now();
        let readings = self.poll_gpus();
        for r in &readings {
            if let Some(why) = &r.stale
                && self
                    .latest
                    .get(&r.info.index)
                    .is_none_or(|old| old.stale.is_none())
            {
                tracing::warn!(gpu = r.info.index, "GPU is stale: {why}");
            }
        }
        if self.node.is_some() {
            let uuids: HashMap<u32, String> = readings
                .iter()
                .map(|r| (r.info.index, r.info.uuid.clone()))
                .collect();
            let unplaced: std::collections::HashSet<(u32, u32)> = self
                .holders
                .iter()
                .copied()
                .filter(|(gpu, pid)| {
                    self.jobs.job_of(*pid).is_none()
                        && uuids.get(gpu).is_none_or(|u| !self.pods.contains_key(u))
                })
                .collect();
            let new_holder = !unplaced.is_subset(&self.pods_asked);
            self.refresh_pods(now, new_holder);
            self.pods_asked = unplaced;
            let pods = self.pods.clone();
            let pod = move |gpu: u32| uuids.get(&gpu).and_then(|u| pods.get(u)).cloned();
            let node = self.node.as_mut().expect("node mode");
            if let Err(e) =
                node.discover(&mut self.jobs, &mut self.kernel, &self.holders, &pod, now)
            {
                tracing::warn!("following a new job: {e}");
            }
        }
        // One read of the kernel's tables: discovery and the interval line see the same
        // processes (a process both forked and exited since the last read is in both).
        let slots: Vec<u32> = self.jobs.slots().into_iter().map(|(s, _, _)| s).collect();
        let snap = match self.collector.snapshot(&self.kernel, &slots) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("reading the kernel maps: {e}");
                None
            }
        };
        if let Some(snap) = &snap {
            let procs: Vec<(u32, monitor_common::ProcInfo)> =
                snap.procs.iter().map(|(&p, t)| (p, t.info)).collect();
            for pid in self.jobs.observe(&[], Some(&procs)) {
                self.kernel.forget_vanished(pid);
            }
        }
        let changes = self.jobs.reassign(&mut self.kernel, &self.holders, true);
        self.apply_changes(changes);
        for r in &readings {
            self.remember(r);
        }
        self.emit_gpus(readings);
        if let Some(snap) = snap {
            self.interval_line(snap);
        }
        match self.kernel.sync_issue_probe() {
            Ok(attached) => self.issue_probe = attached,
            Err(e) if !self.issue_probe_failed => {
                self.issue_probe_failed = true;
                tracing::warn!(
                    "block issue probe: {e}; block latency is missing for requests the kernel does not time itself"
                );
            }
            Err(_) => {}
        }
        if self.node.is_some() {
            let changes = self.jobs.forget_ended(&mut self.kernel, now);
            self.apply_changes(changes);
        }
        self.jobs.prune_exited(EXITED_KEPT);
        self.publish();
        self.health.touch();
    }

    /// The interval line from a snapshot; then the kernel may forget the exited processes
    /// whose final counters it holds.
    fn interval_line(&mut self, snap: crate::collector::Snapshot) {
        let gone: Vec<(u32, u64)> = snap
            .procs
            .iter()
            .filter(|(_, p)| p.info.exited != 0)
            .map(|(&pid, p)| (pid, p.info.start_ns))
            .collect();
        self.kernel_processes = (snap.procs.len() - gone.len()) as u64;
        // Where the jobs' data live: only for the verdict, so only when there is a GPU to give one.
        let files = if self.sampler.is_some() {
            sample_open_files(&self.jobs, 64)
        } else {
            Vec::new()
        };
        let mut line = self.deltas.interval(snap, &self.jobs, files);
        line.record_errors = self.recorder.as_ref().map_or(0, Recorder::errors);
        self.emit(Line::Interval(line));
        if let Some(r) = &mut self.recorder {
            r.sync();
        }
        for (pid, start) in gone {
            self.kernel.forget(pid, start);
        }
    }

    /// Rebuilds what `/metrics` shows.
    fn publish(&mut self) {
        let label_of: HashMap<u32, JobLabels> =
            self.jobs.iter().map(|j| (j.id, j.labels.clone())).collect();
        let jobs = self
            .jobs
            .iter()
            .map(|j| {
                let acc = self.ledger.jobs.get(&j.id);
                JobView {
                    labels: j.labels.clone(),
                    up: j.ended.is_none(),
                    roles: acc
                        .map(|a| {
                            a.roles
                                .iter()
                                .filter(|((_, role), _)| role != "launcher")
                                .map(|((rank, role), r)| (rank.clone(), role.clone(), r.clone()))
                                .collect()
                        })
                        .unwrap_or_default(),
                    processes: {
                        let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
                        for r in j.ranks.values() {
                            for role in ["feeder", "worker"] {
                                counts.insert((r.rank.clone(), role.into()), 0);
                            }
                        }
                        counts.insert((String::new(), "launcher".into()), 0);
                        for ((rank, role), n) in j.live_counts() {
                            let name = monitor_common::ROLE_NAMES
                                .get(role as usize)
                                .copied()
                                .unwrap_or("launcher");
                            counts.insert((rank, name.to_string()), n);
                        }
                        counts.into_iter().map(|((r, ro), n)| (r, ro, n)).collect()
                    },
                }
            })
            .collect();
        let owners = &self.owners;
        let gpus = self
            .latest
            .values()
            .map(|r| {
                let owner = owners.get(&r.info.index).and_then(|slot| {
                    let (job, rank) = self.jobs.slot_owner(*slot)?;
                    Some((job.labels.clone(), rank.rank.clone()))
                });
                GpuView {
                    info: r.info.clone(),
                    owner,
                    utilization: r.samples.last().map(|s| s.util),
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
            .collect();
        let attributed = self
            .attribution
            .totals()
            .into_iter()
            .filter_map(|t| {
                Some(AttributedView {
                    labels: label_of.get(&t.job)?.clone(),
                    rank: t.rank,
                    gpu: t.totals.gpu,
                    uuid: t.identity.uuid,
                    busy_s: t.totals.busy_s,
                    idle_s: t.totals.idle_s,
                })
            })
            .collect();
        let view = View {
            block: self
                .ledger
                .block
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            drops: self.ledger.drops.clone(),
            record_errors: self.recorder.as_ref().map_or(0, Recorder::errors),
            jobs,
            gpus,
            attributed,
            gpu_source: self.gpu_source(),
            slots_used: self.jobs.slots().len() as u64,
            slots_total: self.kernel.options().slots as u64,
            kernel_processes: self.kernel_processes,
            issue_probe: self.issue_probe,
            hostname: self.settings.hostname.clone(),
        };
        if let Ok(mut v) = self.view.write() {
            *v = view;
        }
    }

    /// Ends the session: a last read of everything, every queued sample attributed, the job's
    /// exit status, the summary (also written to the record).
    pub fn finish(mut self, exit_status: Option<(u32, Option<i32>)>) -> Summary {
        let stop_ns = crate::gpu::monotonic_ns();
        self.fine_tick();
        self.interval_tick();
        // NVML publishes a sample once its period is over: wait (a little) until every GPU a
        // rank holds has reported up to the stop, so the run's last moments are attributed too.
        let deadline = Instant::now() + Duration::from_millis(1500);
        while self.sampler.is_some() && Instant::now() < deadline {
            let covered = self.owners.keys().all(|g| {
                self.latest.get(g).is_none_or(|r| {
                    r.stale.is_some() || r.samples.last().is_some_and(|s| s.end_ns >= stop_ns)
                })
            });
            if covered {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            self.fine_tick();
            let readings = self.poll_gpus();
            for r in &readings {
                self.remember(r);
            }
            self.emit_gpus(readings);
        }
        self.attribution.flush();
        if let Some((job, status)) = exit_status {
            self.emit(Line::JobEnd(JobEndLine {
                job,
                exit_status: status,
            }));
        }
        self.health.set_attached(false);
        let summary = summary::build(
            &self.ledger,
            &self.attribution.totals(),
            &Context {
                mode: self.settings.mode,
                duration_seconds: self.ledger.covered_seconds(),
                syscalls: self.settings.syscalls,
                gpu_source: self.gpu_source().map(str::to_string),
                gpu_disabled: self.gpu_disabled.clone(),
            },
        );
        self.emit(Line::Summary(Box::new(summary.clone())));
        if let Some(r) = &mut self.recorder {
            r.sync();
        }
        summary
    }
}
