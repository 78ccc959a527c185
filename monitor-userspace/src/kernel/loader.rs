//! Loads `monitor-ebpf`, patches its configuration, attaches every program and hands out the
//! maps. Dropping [`Kernel`] detaches everything.
use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePoint, TracePoint},
};
use monitor_common::{BlockKey, BlockStats, Config, ProcInfo, RoleStats, ThreadInfo};

use super::offsets;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

/// How a program attaches: BTF tracepoints (`tp_btf`, typed arguments such as the
/// `struct request *`) or classic tracepoints (`category:name`). (No fentry: these kernels have
/// no BPF trampolines.)
#[derive(Clone, Copy, Debug)]
pub enum Attach {
    Btf(&'static str),
    Classic(&'static str, &'static str),
}

/// Every program, by its function name in `monitor-ebpf`, and where it attaches.
pub const TRACEPOINTS: &[(&str, Attach)] = &[
    ("sched_switch", Attach::Btf("sched_switch")),
    ("sched_process_fork", Attach::Btf("sched_process_fork")),
    (
        "sched_process_exit",
        Attach::Classic("sched", "sched_process_exit"),
    ),
    (
        "sched_process_exec",
        Attach::Classic("sched", "sched_process_exec"),
    ),
    ("block_io_start", Attach::Btf("block_io_start")),
    ("block_rq_insert", Attach::Btf("block_rq_insert")),
    ("block_rq_issue", Attach::Btf("block_rq_issue")),
    ("block_rq_complete", Attach::Btf("block_rq_complete")),
    ("sys_enter", Attach::Btf("sys_enter")),
    ("sys_exit", Attach::Btf("sys_exit")),
];

/// The loaded, attached programs and their maps.
pub struct Kernel {
    // Keeps the programs and their links alive.
    ebpf: Ebpf,
    pub tracked: Array<MapData, u32>,
    pub procs: HashMap<MapData, u32, ProcInfo>,
    pub threads: HashMap<MapData, u32, ThreadInfo>,
    pub role_stats: PerCpuArray<MapData, RoleStats>,
    pub role_open: Array<MapData, u64>,
    pub block_stats: PerCpuHashMap<MapData, BlockKey, BlockStats>,
    pub drops: PerCpuArray<MapData, u64>,
    pub feeder_events: RingBuf<MapData>,
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the kernel object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Kernel {
    /// Loads and attaches everything. `feeder_tid` selects the thread whose state changes are
    /// streamed with timestamps.
    pub fn load(feeder_tid: u32) -> Result<Self> {
        if OBJECT.is_empty() {
            bail!("this stallmon was built with AYA_BUILD_SKIP=1 and carries no kernel programs");
        }
        // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lifting it is harmless later.
        let rlim = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: plain syscall with a valid pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };

        let offsets = offsets::resolve_running_kernel()?;
        let config = Config {
            offsets,
            feeder_tid,
            _pad: 0,
        };
        let btf =
            Btf::from_sys_fs().context("cannot load kernel BTF from /sys/kernel/btf/vmlinux")?;
        let pid_slots = pid_max()?;
        let mut ebpf = EbpfLoader::new()
            .btf(&btf)
            .map_max_entries("TRACKED", pid_slots)
            .override_global("CONFIG", &config, true)
            .load(OBJECT)
            .map_err(explain_load_error)?;

        for (prog, attach) in TRACEPOINTS {
            let p = ebpf
                .program_mut(prog)
                .ok_or_else(|| anyhow!("program {prog} missing from the kernel object"))?;
            match attach {
                Attach::Btf(tp) => {
                    let p: &mut BtfTracePoint = p.try_into()?;
                    p.load(tp, &btf)
                        .with_context(|| format!("loading tp_btf/{tp} (verifier)"))?;
                    p.attach()
                        .with_context(|| format!("attaching tp_btf/{tp}"))?;
                }
                Attach::Classic(cat, tp) => {
                    let p: &mut TracePoint = p.try_into()?;
                    p.load()
                        .with_context(|| format!("loading tracepoint {cat}:{tp} (verifier)"))?;
                    p.attach(cat, tp)
                        .with_context(|| format!("attaching tracepoint {cat}:{tp}"))?;
                }
            }
        }

        Ok(Self {
            tracked: take(&mut ebpf, "TRACKED")?,
            procs: take(&mut ebpf, "PROCS")?,
            threads: take(&mut ebpf, "THREADS")?,
            role_stats: take(&mut ebpf, "ROLE_STATS")?,
            role_open: take(&mut ebpf, "ROLE_OPEN")?,
            block_stats: take(&mut ebpf, "BLOCK_STATS")?,
            drops: take(&mut ebpf, "DROPS")?,
            feeder_events: take(&mut ebpf, "FEEDER_EVENTS")?,
            ebpf,
        })
    }

    /// Starts tracking process `tgid` with `role` (no-op if already tracked).
    pub fn track(&mut self, tgid: u32, role: u32, parent_tgid: u32) -> Result<()> {
        let info = ProcInfo {
            role,
            parent_tgid,
            ..ProcInfo::default()
        };
        match self.procs.insert(&tgid, &info, 1 /* BPF_NOEXIST */) {
            Ok(()) => self
                .tracked
                .set(tgid, &(role + 1), 0)
                .with_context(|| format!("cannot track pid {tgid} (above pid_max?)")),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("cannot track pid {tgid}")),
        }
    }

    /// Forgets an exited process (its final counters have been read).
    pub fn untrack(&mut self, tgid: u32) {
        let _ = self.procs.remove(&tgid);
        let _ = self.tracked.set(tgid, &0, 0);
    }

    /// Program ids (for `bpf_stats` run-time accounting in the benchmark).
    pub fn program_ids(&self) -> Vec<(String, u32)> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| p.info().ok().map(|i| (name.to_string(), i.id())))
            .collect()
    }
}

/// The kernel's pid_max: the size of the pid-indexed TRACKED array.
fn pid_max() -> Result<u32> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .context("reading /proc/sys/kernel/pid_max")?;
    raw.trim()
        .parse::<u32>()
        .context("parsing /proc/sys/kernel/pid_max")
        .map(|n| n.max(1024))
}

/// Turns the most common load failure into advice.
fn explain_load_error(e: aya::EbpfError) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        anyhow!(
            "loading eBPF programs was refused ({text}): run stallmon as root or with CAP_BPF and CAP_PERFMON"
        )
    } else {
        anyhow!("loading eBPF programs failed: {text}")
    }
}
