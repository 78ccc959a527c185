//! Phase 4: the kernel's own counters of every BPF program (`bpf_stats`: run_time_ns and
//! run_cnt, from `/proc/<tracer>/fdinfo`), for every tracer variant: BPF time per fio I/O and
//! per read-family syscall, and per program run. On during this phase only, because the counters
//! cost two clock reads per program run themselves.
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    os::fd::{FromRawFd, OwnedFd},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    Bench, Variant,
    fio::parse_fio,
    syscall_loop::LOOP_TIMEOUT,
    workloads::{Beside, HOLD_SH, Stallmon, run_to_end, start_bpftrace},
};

/// One program's counters (or their difference over a workload).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgCount {
    pub run_cnt: u64,
    pub run_time_ns: u64,
}

impl ProgCount {
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.run_cnt > 0).then(|| self.run_time_ns as f64 / self.run_cnt as f64)
    }
}

/// Counters by attach point (tracepoint name).
pub type ProgStats = BTreeMap<String, ProgCount>;

/// One tracer variant: its programs during fio and during the syscall loop (mix mode).
pub struct BpfRun {
    pub fio: ProgStats,
    pub fio_ios: u64,
    pub syscall_loop: ProgStats,
    pub loop_calls: u64,
}

pub struct BpfResults {
    pub variants: Vec<(Variant, BpfRun)>,
    /// ns per run of an empty bpftrace program on `syscalls:sys_enter_read`.
    pub floor_ns: f64,
}

impl Bench {
    pub fn phase_bpf_stats(&mut self) -> Result<BpfResults> {
        let _stats = enable()?;
        let mut variants = Vec::new();
        for v in Variant::TRACERS {
            self.wait_quiet();
            let run = self
                .stats_of(v)
                .with_context(|| format!("bpf_stats, {}", v.key()))?;
            eprintln!(
                "bench:   bpf_stats {:<18} {:>6.0} ns BPF per fio I/O, {:>6.1} ns per syscall",
                v.key(),
                sum_ns(&run.fio) / run.fio_ios as f64,
                sum_ns(&run.syscall_loop) / run.loop_calls as f64
            );
            variants.push((v, run));
        }
        // Calibration: what an empty program costs on this machine, the floor under every
        // number above (bpf_stats itself adds two clock reads per run).
        let mut cal = start_bpftrace(
            Command::new("bpftrace").args(["-e", "tracepoint:syscalls:sys_enter_read { }"]),
            1,
        )?;
        let c0 = prog_stats(cal.pid())?;
        let mut c = Command::new(&self.readloop);
        c.args(&self.readloop_argv("read", 200_000)[1..]);
        run_to_end(&mut c, "readloop", LOOP_TIMEOUT)?;
        let c1 = prog_stats(cal.pid())?;
        cal.stop_ok(libc::SIGINT)?;
        let floor_ns = delta(&c0, &c1)
            .values()
            .find_map(ProgCount::ns_per_run)
            .unwrap_or(f64::NAN);
        Ok(BpfResults { variants, floor_ns })
    }

    fn stats_of(&self, v: Variant) -> Result<BpfRun> {
        let rt = self.cfg.stats_fio_runtime_s;
        let calls = self.cfg.stats_loop_reads;
        let fio_out = self.dir.join("fio-bpf-stats.json");
        let _ = fs::remove_file(&fio_out);
        let fio_argv = self.fio_argv(rt, self.cfg.fio_ramp_ms, &fio_out);
        let loop_argv = self.readloop_argv("mix", calls);
        let (fio, syscall_loop) = match v.stallmon() {
            Some((syscalls, true)) => {
                let fio = self.held_job(syscalls, &fio_argv, Self::fio_timeout(rt))?;
                let lp = self.held_job(syscalls, &loop_argv, LOOP_TIMEOUT)?;
                (fio, lp)
            }
            _ => {
                let t = self.beside(v)?.context("a variant with a tracer")?;
                let s0 = prog_stats(t.pid())?;
                let mut c = Command::new("fio");
                c.args(&fio_argv[1..]);
                run_to_end(&mut c, "fio", Self::fio_timeout(rt))?;
                let s1 = prog_stats(t.pid())?;
                let mut c = Command::new(&loop_argv[0]);
                c.args(&loop_argv[1..]);
                run_to_end(&mut c, "readloop", LOOP_TIMEOUT)?;
                let s2 = prog_stats(t.pid())?;
                if let Beside::Stallmon(..) = t {
                    ensure!(
                        !s2.is_empty(),
                        "no BPF program found in stallmon's descriptors"
                    );
                }
                t.stop()?;
                (delta(&s0, &s1), delta(&s1, &s2))
            }
        };
        Ok(BpfRun {
            fio,
            fio_ios: parse_fio(&fio_out)?.ios,
            syscall_loop,
            loop_calls: calls,
        })
    }

    /// Runs `argv` as the job of a stallmon, and returns stallmon's program counters from its
    /// ready signal to the end of the command (the job then waits, so that stallmon stays).
    fn held_job(&self, syscalls: bool, argv: &[String], timeout: Duration) -> Result<ProgStats> {
        let done = self.dir.join("job.done");
        let _ = fs::remove_file(&done);
        let mut job = vec![
            "sh".to_string(),
            "-c".into(),
            HOLD_SH.into(),
            "sh".into(),
            done.display().to_string(),
        ];
        job.extend(argv.iter().cloned());
        let mut sm = Stallmon::job(syscalls, &job)?;
        let s0 = prog_stats(sm.pid())?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Ok(s) = fs::read_to_string(&done)
                && s.ends_with('\n')
            {
                break s.trim().to_string();
            }
            if let Some(st) = sm.exited() {
                bail!("stallmon exited early ({st})");
            }
            ensure!(
                Instant::now() < deadline,
                "{argv:?} under stallmon timed out"
            );
            thread::sleep(Duration::from_millis(50));
        };
        let s1 = prog_stats(sm.pid())?;
        // stallmon stops the held `sleep` and exits with its status.
        sm.stop()?;
        ensure!(
            status == "0",
            "{argv:?} under stallmon exited with {status}"
        );
        ensure!(
            !s1.is_empty(),
            "no BPF program found in stallmon's descriptors"
        );
        Ok(delta(&s0, &s1))
    }
}

/// Holds bpf_stats on while alive.
pub enum StatsGuard {
    /// BPF_ENABLE_STATS: on until the descriptor is closed, even if we crash.
    Fd(#[allow(dead_code)] OwnedFd),
    /// Fallback: the sysctl, restored to its previous value on drop.
    Sysctl(String),
}

impl Drop for StatsGuard {
    fn drop(&mut self) {
        if let StatsGuard::Sysctl(prev) = self {
            let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", prev.as_bytes());
        }
    }
}

pub fn enable() -> Result<StatsGuard> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    #[repr(C)]
    struct EnableStats {
        kind: u32, // BPF_STATS_RUN_TIME = 0
    }
    let attr = EnableStats { kind: 0 };
    // SAFETY: the bpf syscall with a valid attribute of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            &attr as *const EnableStats,
            std::mem::size_of::<EnableStats>() as libc::c_uint,
        )
    };
    if fd >= 0 {
        // SAFETY: a descriptor the kernel just returned to us.
        return Ok(StatsGuard::Fd(unsafe { OwnedFd::from_raw_fd(fd as i32) }));
    }
    let path = "/proc/sys/kernel/bpf_stats_enabled";
    let prev = fs::read_to_string(path).context("reading kernel.bpf_stats_enabled")?;
    fs::write(path, "1").context("setting kernel.bpf_stats_enabled=1")?;
    Ok(StatsGuard::Sysctl(prev.trim().to_string()))
}

pub fn enabled() -> bool {
    fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1")
}

fn fdinfo(pid: u32, fd: &str) -> HashMap<String, String> {
    fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The counters of every BPF program that process `pid` holds, by attach point: `/proc/PID/
/// fdinfo` of its program descriptors, named after the tracepoint of its link (or, for
/// perf-event attachments, `bpftool perf`'s).
pub fn prog_stats(pid: u32) -> Result<ProgStats> {
    let mut progs: BTreeMap<u32, ProgCount> = BTreeMap::new();
    let mut names: HashMap<u32, String> = HashMap::new();
    let fd_dir = format!("/proc/{pid}/fd");
    for e in fs::read_dir(&fd_dir).with_context(|| format!("listing {fd_dir}"))? {
        let e = e?;
        let Ok(target) = fs::read_link(e.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        let fd = e.file_name().to_string_lossy().into_owned();
        if target == "anon_inode:bpf-prog" {
            let info = fdinfo(pid, &fd);
            let num = |k: &str| info.get(k).and_then(|v| v.parse::<u64>().ok());
            if let Some(id) = num("prog_id") {
                progs.insert(
                    id as u32,
                    ProgCount {
                        run_cnt: num("run_cnt").unwrap_or(0),
                        run_time_ns: num("run_time_ns").unwrap_or(0),
                    },
                );
            }
        } else if target == "anon_inode:bpf_link" {
            let info = fdinfo(pid, &fd);
            if let (Some(id), Some(tp)) = (
                info.get("prog_id").and_then(|v| v.parse::<u32>().ok()),
                info.get("tp_name"),
            ) {
                names.insert(id, tp.clone());
            }
        }
    }
    if progs.keys().any(|id| !names.contains_key(id)) {
        for (p, id, tp) in perf_show().unwrap_or_default() {
            if p == pid {
                names.entry(id).or_insert(tp);
            }
        }
    }
    let mut out = ProgStats::new();
    for (id, c) in progs {
        let mut name = names.remove(&id).unwrap_or_else(|| format!("prog_{id}"));
        if out.contains_key(&name) {
            name = format!("{name}#{id}");
        }
        out.insert(name, c);
    }
    Ok(out)
}

/// `bpftool perf show`: (pid, prog_id, tracepoint) of perf-event and raw-tracepoint attachments.
pub fn perf_show() -> Result<Vec<(u32, u32, String)>> {
    let out = Command::new("bpftool")
        .args(["perf", "show", "-j"])
        .stderr(Stdio::null())
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e["pid"].as_u64()? as u32,
                e["prog_id"].as_u64()? as u32,
                e["tracepoint"].as_str()?.to_string(),
            ))
        })
        .collect())
}

/// Tracing programs loaded by other processes (concurrent tracers skew every number).
pub fn foreign_tracing_programs() -> Option<usize> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v.as_array()?
            .iter()
            .filter(|p| {
                matches!(
                    p["type"].as_str(),
                    Some("tracing" | "tracepoint" | "raw_tracepoint" | "kprobe" | "perf_event")
                )
            })
            .count(),
    )
}

/// `b - a`, per program.
pub fn delta(a: &ProgStats, b: &ProgStats) -> ProgStats {
    b.iter()
        .map(|(k, v)| {
            let base = a.get(k).copied().unwrap_or_default();
            (
                k.clone(),
                ProgCount {
                    run_cnt: v.run_cnt.saturating_sub(base.run_cnt),
                    run_time_ns: v.run_time_ns.saturating_sub(base.run_time_ns),
                },
            )
        })
        .collect()
}

pub fn merge(a: &ProgStats, b: &ProgStats) -> ProgStats {
    let mut out = a.clone();
    for (k, v) in b {
        let e = out.entry(k.clone()).or_default();
        e.run_cnt += v.run_cnt;
        e.run_time_ns += v.run_time_ns;
    }
    out
}

pub fn sum_ns(s: &ProgStats) -> f64 {
    s.values().map(|c| c.run_time_ns as f64).sum()
}

/// Σ run_time_ns / Σ run_cnt: the event-weighted mean cost of one program run.
pub fn weighted_mean(s: &ProgStats) -> Option<f64> {
    let cnt: u64 = s.values().map(|c| c.run_cnt).sum();
    (cnt > 0).then(|| sum_ns(s) / cnt as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(v: &[(&str, u64, u64)]) -> ProgStats {
        v.iter()
            .map(|(k, cnt, ns)| {
                (
                    k.to_string(),
                    ProgCount {
                        run_cnt: *cnt,
                        run_time_ns: *ns,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn deltas_and_the_weighted_mean() {
        let a = stats(&[("sched_switch", 10, 1000)]);
        let b = stats(&[("sched_switch", 110, 11_000), ("block_rq_issue", 1, 900)]);
        let d = delta(&a, &b);
        assert_eq!(d["sched_switch"].run_cnt, 100);
        assert_eq!(d["sched_switch"].ns_per_run(), Some(100.0));
        // (10000 + 900) / 101: weighted by runs, not the median over programs (500).
        assert!((weighted_mean(&d).unwrap() - 10_900.0 / 101.0).abs() < 1e-9);
        assert_eq!(weighted_mean(&ProgStats::new()), None);
        assert_eq!(merge(&d, &d)["block_rq_issue"].run_cnt, 2);
    }
}
