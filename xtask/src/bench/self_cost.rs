//! Phase 5: stallmon itself, in its default mode, tracing a 64-process job
//! ([`workloads::JOB_PY`](super::workloads::JOB_PY)) with the default 1 s interval: its CPU
//! share over a window with no scrapes in it, then /metrics scrape latency, then its peak RSS.
use std::{
    fs, thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};

use super::{
    Bench, median, min_max, percentile,
    summary::SelfCost,
    workloads::{JOB_PROCESSES, JOB_PY, Stallmon},
};

pub const SCRAPES: usize = 200;

impl Bench {
    pub fn phase_self(&mut self) -> Result<SelfCost> {
        let argv = vec![
            tests::python().display().to_string(),
            "-c".into(),
            JOB_PY.into(),
            self.cache_file.display().to_string(),
            JOB_PROCESSES.to_string(),
        ];
        let mut sm = Stallmon::job(false, &argv)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let job_processes = loop {
            let n = sm.descendants().len();
            if n >= JOB_PROCESSES {
                break n;
            }
            if let Some(st) = sm.exited() {
                bail!("stallmon exited ({st})");
            }
            ensure!(
                Instant::now() < deadline,
                "the {JOB_PROCESSES}-process job did not start (have {n})"
            );
            thread::sleep(Duration::from_millis(100));
        };
        // Let a snapshot or two pass, then measure a clean window (no scrapes in it).
        thread::sleep(Duration::from_millis(1500));
        let (t0, w0) = (cpu_ticks(sm.pid())?, Instant::now());
        thread::sleep(Duration::from_secs(self.cfg.self_secs));
        let (t1, window) = (cpu_ticks(sm.pid())?, w0.elapsed().as_secs_f64());
        // SAFETY: plain getter.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu_fraction = (t1 - t0) as f64 / hz / window;

        let mut scrape_seconds = Vec::with_capacity(SCRAPES);
        let mut body = Vec::new();
        for _ in 0..SCRAPES {
            // Connect to the last byte, over a fresh HTTP/1.0 connection.
            let t = Instant::now();
            let (code, b) = tests::prom::http_get(sm.addr, "/metrics")?;
            scrape_seconds.push(t.elapsed().as_secs_f64());
            ensure!(code == 200, "GET /metrics answered {code}");
            body = b;
            thread::sleep(Duration::from_millis(5));
        }
        let text = String::from_utf8_lossy(&body);
        let tracked_processes_metric = text
            .lines()
            .any(|l| l.starts_with("stallmon_tracked_processes{"))
            .then(|| tests::metric_sum(&text, "stallmon_tracked_processes", &[]));
        let status = fs::read_to_string(format!("/proc/{}/status", sm.pid()))?;
        let kib = |key: &str| -> Option<u64> {
            status
                .lines()
                .find(|l| l.starts_with(key))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        let peak_rss_bytes = kib("VmHWM:").context("no VmHWM in /proc/PID/status")? * 1024;
        let rss_bytes = kib("VmRSS:").unwrap_or(0) * 1024;
        // stallmon stops the job and exits with its status (terminated): not checked.
        sm.stop()?;
        Ok(SelfCost {
            job_processes,
            tracked_processes_metric,
            interval_seconds: 1.0,
            cpu_fraction,
            cpu_window_seconds: window,
            peak_rss_bytes,
            rss_bytes,
            scrape_median_seconds: median(&scrape_seconds),
            scrape_p99_seconds: percentile(&scrape_seconds, 0.99),
            scrape_max_seconds: min_max(&scrape_seconds).1,
            scrape_body_bytes: body.len() as u64,
            scrape_seconds,
        })
    }
}

/// utime + stime of a process (all its threads, dead ones included), in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let utime: u64 = f.get(11).and_then(|s| s.parse().ok()).context("utime")?;
    let stime: u64 = f.get(12).and_then(|s| s.parse().ok()).context("stime")?;
    Ok(utime + stime)
}
