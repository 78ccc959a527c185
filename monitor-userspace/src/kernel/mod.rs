//! The kernel side as user space sees it: BTF offsets ([`offsets`]), the program table,
//! loading and attaching, and the one owner of every map handle ([`Kernel`]): other stages read
//! and write the maps only through its typed methods.
#[cfg(test)]
mod abi_check;
pub mod offsets;

use std::path::PathBuf;

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, tp_btf::BtfTracePointLinkId},
};
use monitor_common::{
    BlockStats, Config, Event, MAX_DEVS, NUM_DROPS, NUM_FD_KINDS, NUM_OPS, NUM_ROLES,
    OpenIntervals, ProcInfo, ReadStats, SlotConf, SlotStats, StallStats, merge::Accumulate,
    slot_index,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

/// A program of `monitor-ebpf` and the BTF tracepoint it attaches to. (No kprobes, no fentry:
/// these kernels have neither.)
#[derive(Clone, Copy, Debug)]
pub struct Program {
    pub name: &'static str,
    pub tracepoint: &'static str,
    /// Attached only with `--syscalls`.
    pub syscalls_only: bool,
}

const fn prog(name: &'static str, syscalls_only: bool) -> Program {
    Program {
        name,
        tracepoint: name,
        syscalls_only,
    }
}

/// Every program, by its function name in `monitor-ebpf`.
pub const PROGRAMS: &[Program] = &[
    prog("sched_switch", false),
    prog("sched_process_fork", false),
    prog("sched_process_exec", false),
    prog("sched_process_exit", false),
    prog("block_io_start", false),
    prog("block_rq_issue", false),
    prog("block_rq_complete", false),
    prog("sys_enter", true),
    prog("sys_exit", true),
];

/// Why the kernel side could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "cannot read kernel BTF at {path} ({why}): stallmon needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf { path: PathBuf, why: String },
    #[error("{0}")]
    Btf(String),
    #[error("this stallmon was built with AYA_BUILD_SKIP=1 and carries no kernel programs")]
    NoObject,
    #[error(
        "loading eBPF programs was refused ({0}): run stallmon as root or with CAP_BPF and CAP_PERFMON"
    )]
    NotPermitted(String),
    #[error("loading eBPF programs failed: {0}")]
    Load(String),
    #[error("{what}: {source}")]
    Map {
        what: String,
        #[source]
        source: MapError,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Walks an error's sources for an `EPERM`/`EACCES` from a syscall.
fn is_permission_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn load_error(e: impl std::error::Error + 'static) -> KernelError {
    let text = error_chain(&e);
    if is_permission_error(&e) {
        KernelError::NotPermitted(text)
    } else {
        KernelError::Load(text)
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn map_err(what: impl Into<String>) -> impl FnOnce(MapError) -> KernelError {
    let what = what.into();
    move |source| KernelError::Map { what, source }
}

/// What to load.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Attach the syscall programs (exact per-call read latency).
    pub syscalls: bool,
    /// Rank slots (sizes the per-slot arrays).
    pub slots: u32,
    /// Time every block request's issue with the probe, even where the block layer keeps a
    /// timestamp of its own.
    pub probe_issue_time: bool,
}

/// The program that times issues where the block layer does not (see
/// [`Kernel::sync_issue_probe`]).
const ISSUE_PROGRAM: &str = "block_rq_issue";

/// The loaded, attached programs and every map handle. Dropping it detaches everything.
pub struct Kernel {
    // Keeps the programs and their links alive.
    ebpf: Ebpf,
    /// The issue probe's link while it is attached.
    issue_link: Option<BtfTracePointLinkId>,
    tracked: Array<MapData, u32>,
    slot_conf: Array<MapData, SlotConf>,
    procs: HashMap<MapData, u32, ProcInfo>,
    slot_stats: PerCpuArray<MapData, SlotStats>,
    open: PerCpuArray<MapData, OpenIntervals>,
    stalls: Array<MapData, StallStats>,
    reads: PerCpuArray<MapData, ReadStats>,
    block_devs: Array<MapData, u32>,
    dev_timed: Array<MapData, u32>,
    block_stats: PerCpuArray<MapData, BlockStats>,
    drops: PerCpuArray<MapData, u64>,
    events: RingBuf<MapData>,
    options: LoadOptions,
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, KernelError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| KernelError::Load(format!("map {name} missing from the kernel object")))?;
    T::try_from(map).map_err(map_err(format!("map {name}")))
}

/// The kernel's pid_max: the size of the pid-indexed TRACKED array.
fn pid_max() -> Result<u32, KernelError> {
    let path = "/proc/sys/kernel/pid_max";
    let raw = std::fs::read_to_string(path).map_err(|source| KernelError::Io {
        path: path.into(),
        source,
    })?;
    raw.trim()
        .parse::<u32>()
        .map(|n| n.max(1024))
        .map_err(|e| KernelError::Load(format!("parsing {path}: {e}")))
}

impl Kernel {
    /// Loads and attaches everything.
    pub fn load(options: LoadOptions) -> Result<Self, KernelError> {
        if OBJECT.is_empty() {
            return Err(KernelError::NoObject);
        }
        // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lifting it is harmless later.
        let rlim = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: plain syscall with a valid pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };

        let mut offsets = offsets::resolve_running_kernel()?;
        if options.probe_issue_time {
            offsets.rqf_stats = 0;
        }
        let config = Config { offsets };
        let btf = Btf::from_sys_fs().map_err(|e| KernelError::NoBtf {
            path: offsets::btf_path(),
            why: e.to_string(),
        })?;
        let slots = options.slots.max(1);
        let per_slot = slots * NUM_ROLES as u32;
        let per_kind = per_slot * NUM_FD_KINDS as u32;
        let mut ebpf = EbpfLoader::new()
            .btf(&btf)
            .map_max_entries("TRACKED", pid_max()?)
            .map_max_entries("SLOT_CONF", slots)
            .map_max_entries("SLOT_STATS", per_slot)
            .map_max_entries("OPEN", per_slot)
            .map_max_entries("STALLS", per_kind)
            .map_max_entries("READS", if options.syscalls { per_kind } else { 1 })
            .override_global("CONFIG", &config, true)
            // TASKS is a task-storage map: aya has no user-space wrapper for it, and needs none.
            .allow_unsupported_maps()
            .load(OBJECT)
            .map_err(load_error)?;

        let mut issue_link = None;
        for p in PROGRAMS
            .iter()
            .filter(|p| options.syscalls || !p.syscalls_only)
        {
            let prog = ebpf.program_mut(p.name).ok_or_else(|| {
                KernelError::Load(format!("program {} missing from the kernel object", p.name))
            })?;
            let prog: &mut BtfTracePoint = prog.try_into().map_err(load_error)?;
            prog.load(p.tracepoint, &btf).map_err(|e| {
                let k = load_error(e);
                KernelError::Load(format!("loading tp_btf/{} (verifier): {k}", p.tracepoint))
            })?;
            let link = prog.attach().map_err(|e| {
                KernelError::Load(format!(
                    "attaching tp_btf/{}: {}",
                    p.tracepoint,
                    error_chain(&e)
                ))
            })?;
            if p.name == ISSUE_PROGRAM {
                issue_link = Some(link);
            }
        }

        Ok(Self {
            tracked: take(&mut ebpf, "TRACKED")?,
            slot_conf: take(&mut ebpf, "SLOT_CONF")?,
            procs: take(&mut ebpf, "PROCS")?,
            slot_stats: take(&mut ebpf, "SLOT_STATS")?,
            open: take(&mut ebpf, "OPEN")?,
            stalls: take(&mut ebpf, "STALLS")?,
            reads: take(&mut ebpf, "READS")?,
            block_devs: take(&mut ebpf, "BLOCK_DEVS")?,
            dev_timed: take(&mut ebpf, "DEV_TIMED")?,
            block_stats: take(&mut ebpf, "BLOCK_STATS")?,
            drops: take(&mut ebpf, "DROPS")?,
            events: take(&mut ebpf, "EVENTS")?,
            ebpf,
            issue_link,
            options: LoadOptions { slots, ..options },
        })
    }

    pub fn options(&self) -> LoadOptions {
        self.options
    }

    /// Attaches the issue probe while some block device needs it, and detaches it otherwise.
    /// Where the block layer times requests itself (`RQF_STATS`, learnt per device at each
    /// completion) the probe has nothing to do but still costs ~100 ns per I/O of the machine
    /// (docs/performance.md). It stays attached before any device is seen, while one has not
    /// completed a request yet, and while one completes requests without the kernel's
    /// timestamp; a device that first appears while it is detached has its requests up to the
    /// next call counted without latency. Returns whether the probe is attached.
    pub fn sync_issue_probe(&mut self) -> Result<bool, KernelError> {
        if self.options.probe_issue_time {
            return Ok(true);
        }
        let mut seen = false;
        let mut untimed = false;
        for slot in 0..MAX_DEVS {
            if self.block_devs.get(&slot, 0).is_ok_and(|d| d != 0) {
                seen = true;
                untimed |= self.dev_timed.get(&slot, 0).is_ok_and(|t| t == 0);
            }
        }
        let needed = !seen || untimed;
        if needed == self.issue_link.is_some() {
            return Ok(needed);
        }
        let prog: &mut BtfTracePoint = self
            .ebpf
            .program_mut(ISSUE_PROGRAM)
            .ok_or_else(|| KernelError::Load(format!("program {ISSUE_PROGRAM} missing")))?
            .try_into()
            .map_err(load_error)?;
        match self.issue_link.take() {
            Some(link) => prog.detach(link).map_err(load_error)?,
            None => self.issue_link = Some(prog.attach().map_err(load_error)?),
        }
        tracing::debug!(attached = needed, "block issue probe");
        Ok(needed)
    }

    /// Starts tracking process `pid` under `value` (`tracked_value(slot, role)`). An entry left
    /// by an exited process with the same PID is replaced.
    pub fn track(&mut self, pid: u32, value: u32, parent: u32) -> Result<(), KernelError> {
        let info = ProcInfo {
            tracked: value,
            parent_tgid: parent,
            ..ProcInfo::default()
        };
        if let Ok(old) = self.procs.get(&pid, 0)
            && old.exited != 0
        {
            let _ = self.procs.remove(&pid);
        }
        match self.procs.insert(&pid, &info, 1 /* BPF_NOEXIST */) {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(map_err(format!("cannot track PID {pid}"))(e)),
        }
        self.retag(pid, value)
    }

    /// Changes the role or rank of a tracked process (its threads follow at their next switch).
    pub fn retag(&mut self, pid: u32, value: u32) -> Result<(), KernelError> {
        self.tracked
            .set(pid, &value, 0)
            .map_err(map_err(format!("cannot track PID {pid} (above pid_max?)")))
    }

    /// Forgets an exited process whose final counters have been read, unless its PID already
    /// belongs to a new process.
    pub fn forget(&mut self, pid: u32, start_ns: u64) {
        if let Ok(p) = self.procs.get(&pid, 0)
            && p.exited != 0
            && p.start_ns == start_ns
        {
            let _ = self.procs.remove(&pid);
        }
    }

    /// Forgets a process that exited without the kernel seeing it: user space tracked it
    /// (`track`, `start_ns` 0) after it had already exited, so no exit marks its entry, and its
    /// `TRACKED` value would make the next process given its PID part of the job. An entry the
    /// kernel made at fork (the PID already reused by a tracked process) is left alone.
    pub fn forget_vanished(&mut self, pid: u32) {
        if let Ok(p) = self.procs.get(&pid, 0)
            && p.exited == 0
            && p.start_ns == 0
        {
            let _ = self.tracked.set(pid, &0, 0);
            let _ = self.procs.remove(&pid);
        }
    }

    /// Stops tracking a live process (its job was forgotten).
    pub fn untrack(&mut self, pid: u32) {
        let _ = self.tracked.set(pid, &0, 0);
        let _ = self.procs.remove(&pid);
    }

    /// The feeder thread of `slot` (0: the feeder process's main thread).
    pub fn set_feeder_tid(&mut self, slot: u32, tid: u32) -> Result<(), KernelError> {
        self.slot_conf
            .set(
                slot,
                &SlotConf {
                    feeder_tid: tid,
                    _pad: 0,
                },
                0,
            )
            .map_err(map_err(format!("slot {slot}")))
    }

    /// Every tracked process (live, or exited and not yet forgotten).
    pub fn procs(&self) -> Vec<(u32, ProcInfo)> {
        self.procs.iter().filter_map(Result::ok).collect()
    }

    /// Closed state time and submitted I/O of `(slot, role)`, summed over CPUs, and the
    /// threads in each state now.
    pub fn slot_role(
        &self,
        slot: u32,
        role: u32,
    ) -> Result<(SlotStats, OpenIntervals), KernelError> {
        let i = slot_index(slot, role);
        let stats = self
            .slot_stats
            .get(&i, 0)
            .map_err(map_err("reading SLOT_STATS"))?;
        let open = self.open.get(&i, 0).map_err(map_err("reading OPEN"))?;
        Ok((
            SlotStats::sum(stats.iter()),
            OpenIntervals::sum(open.iter()),
        ))
    }

    /// Read stalls of `(slot, role)` by fd kind.
    pub fn stalls(&self, slot: u32, role: u32) -> [StallStats; NUM_FD_KINDS] {
        let base = slot_index(slot, role) * NUM_FD_KINDS as u32;
        std::array::from_fn(|k| self.stalls.get(&(base + k as u32), 0).unwrap_or_default())
    }

    /// `--syscalls`: completed read calls of `(slot, role)` by fd kind.
    pub fn reads(&self, slot: u32, role: u32) -> Option<[ReadStats; NUM_FD_KINDS]> {
        if !self.options.syscalls {
            return None;
        }
        let base = slot_index(slot, role) * NUM_FD_KINDS as u32;
        Some(std::array::from_fn(|k| {
            self.reads
                .get(&(base + k as u32), 0)
                .map(|v| ReadStats::sum(v.iter()))
                .unwrap_or_default()
        }))
    }

    /// Block totals per (device number, operation) of every device seen.
    pub fn block(&self) -> Vec<(u32, usize, BlockStats)> {
        let mut out = Vec::new();
        for slot in 0..MAX_DEVS {
            let Ok(dev) = self.block_devs.get(&slot, 0) else {
                continue;
            };
            if dev == 0 {
                continue;
            }
            for op in 0..NUM_OPS {
                let i = slot * NUM_OPS as u32 + op as u32;
                if let Ok(v) = self.block_stats.get(&i, 0) {
                    let s = BlockStats::sum(v.iter());
                    if s.count != 0 || s.bytes != 0 {
                        out.push((dev, op, s));
                    }
                }
            }
        }
        out
    }

    /// Lost events by reason, summed over CPUs.
    pub fn drops(&self) -> [u64; NUM_DROPS] {
        std::array::from_fn(|i| {
            self.drops
                .get(&(i as u32), 0)
                .map(|v| u64::sum(v.iter()))
                .unwrap_or(0)
        })
    }

    /// Ring-buffer records since the last call, in time order.
    pub fn drain_events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() >= size_of::<Event>() {
                // SAFETY: the kernel writes whole Event records; read unaligned.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) });
            }
        }
        out.sort_by_key(|e| e.ts_ns);
        out
    }
}
