//! The machine and its state, for the report: CPU, memory, kernel, the disk under
//! target/bench, tool versions, load average, date.
use std::{fs, os::unix::fs::MetadataExt, path::Path, process::Command, thread};

use super::summary::Fact;

pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub fn date_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn first_line(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout);
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|| "?".into())
}

/// The disk holding `data_file`: name (major:minor), I/O scheduler.
fn disk(data_file: &Path) -> String {
    let Ok(m) = fs::metadata(data_file) else {
        return "unknown".into();
    };
    let dev = m.dev();
    let (maj, min) = (libc::major(dev), libc::minor(dev));
    let name = fs::read_link(format!("/sys/dev/block/{maj}:{min}"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "?".into());
    let disk_name = tests::disk_name_of(data_file).unwrap_or_else(|_| name.clone());
    let sched = fs::read_to_string(format!("/sys/block/{disk_name}/queue/scheduler"))
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .find(|w| w.starts_with('['))
                .map(|w| w.trim_matches(['[', ']']).to_string())
        })
        .unwrap_or_else(|| "?".into());
    format!("{name} ({maj}:{min}), scheduler {sched}")
}

pub fn describe(data_file: &Path) -> Vec<Fact> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let nproc = thread::available_parallelism().map_or(0, |n| n.get());
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kib: f64 = m
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let stallmon = std::env::var_os("STALLMON_BIN")
        .map(|b| first_line(&b.to_string_lossy(), "--version"))
        .unwrap_or_else(|| "?".into());
    [
        ("CPU", cpu),
        ("CPUs (nproc)", nproc.to_string()),
        ("memory", mem),
        ("kernel", kernel),
        ("disk under target/bench", disk(data_file)),
        ("stallmon", stallmon),
        ("fio", first_line("fio", "--version")),
        ("bpftrace", first_line("bpftrace", "--version")),
        ("python3", first_line("python3", "--version")),
    ]
    .into_iter()
    .map(|(name, value)| Fact {
        name: name.into(),
        value,
    })
    .collect()
}
