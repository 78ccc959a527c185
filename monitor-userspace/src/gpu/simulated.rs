//! A simulated GPU driven by a workload's own record of its "GPU steps", for machines without a
//! GPU and for validation against a known truth.
//!
//! The workload appends one line per step to a file: `<start_ns> <end_ns>`, the busy interval on
//! `CLOCK_MONOTONIC` (Python: `time.monotonic_ns()`). [`SimulatedGpu`] turns that timeline into
//! utilization samples of a fixed period, like NVML's sample buffer: util = busy overlap / period.
//!
//! A step is only known once its line is written, i.e. when it ends, so periods are emitted only up
//! to "now minus a lag" (default 1 s): steps longer than the lag would be reported late as idle.
//! [`GpuSampler::drain`] emits everything up to now at the end of a run.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{GpuInfo, GpuReading, GpuSampler, UtilSample};

/// Default sample period (NVML samples every 1/6 s on recent GPUs; 100 ms is finer).
pub const DEFAULT_PERIOD_NS: u64 = 100_000_000;
/// Default lag behind now before a period is emitted.
pub const DEFAULT_LAG_NS: u64 = 1_000_000_000;
/// Longest accepted line; longer garbage is discarded.
const MAX_LINE: usize = 4096;

/// A simulated GPU (index 0, uuid `SIMULATED-GPU-0`, model `simulated`).
pub struct SimulatedGpu {
    path: PathBuf,
    info: GpuInfo,
    period_ns: u64,
    lag_ns: u64,
    /// Bytes of the file already consumed.
    offset: u64,
    /// Incomplete last line (no newline yet).
    partial: Vec<u8>,
    /// Known busy intervals ending after `next_start`, sorted and non-overlapping.
    busy: Vec<(u64, u64)>,
    /// Start of the next period to emit.
    next_start: u64,
    bad_lines: u64,
    /// The file has been opened once: from then on, its disappearance is an error.
    seen: bool,
    /// Busy time reported so far (drives the synthetic PCIe counters).
    busy_total_ns: u64,
}

impl SimulatedGpu {
    /// Follows `path` (which may not exist yet) from now on, with the default period and lag.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self::with_timing(
            path,
            super::monotonic_ns(),
            DEFAULT_PERIOD_NS,
            DEFAULT_LAG_NS,
        )
    }

    /// Follows `path` with the timeline starting at `start_ns`; periods of `period_ns` (at least
    /// 1 ns) are emitted once they end `lag_ns` before now.
    pub fn with_timing(
        path: impl Into<PathBuf>,
        start_ns: u64,
        period_ns: u64,
        lag_ns: u64,
    ) -> Self {
        Self {
            path: path.into(),
            info: GpuInfo {
                index: 0,
                uuid: "SIMULATED-GPU-0".into(),
                model: "simulated".into(),
            },
            period_ns: period_ns.max(1),
            lag_ns,
            offset: 0,
            partial: Vec::new(),
            busy: Vec::new(),
            next_start: start_ns,
            bad_lines: 0,
            seen: false,
            busy_total_ns: 0,
        }
    }

    /// The followed file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lines that could not be parsed so far.
    pub fn bad_lines(&self) -> u64 {
        self.bad_lines
    }

    /// Reads lines appended since the last call. A missing file is not an error until the file
    /// has been seen (the workload has not started yet); one that disappears afterwards makes the
    /// GPU stale. A file that shrank is re-read from the start.
    fn read_new(&mut self) -> Result<(), String> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound && !self.seen => return Ok(()),
            Err(e) => return Err(format!("{}: {e}", self.path.display())),
        };
        self.seen = true;
        let meta = file
            .metadata()
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        if meta.is_dir() {
            return Err(format!("{}: is a directory", self.path.display()));
        }
        let len = file
            .metadata()
            .map_err(|e| format!("{}: {e}", self.path.display()))?
            .len();
        if len < self.offset {
            self.offset = 0;
            self.partial.clear();
        }
        file.seek(SeekFrom::Start(self.offset))
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        let mut buf = std::mem::take(&mut self.partial);
        let n = file
            .read_to_end(&mut buf)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        self.offset += n as u64;

        let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        self.partial = buf.split_off(complete);
        if self.partial.len() > MAX_LINE {
            self.partial.clear();
            self.bad_lines += 1;
        }
        for line in buf.split(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(line);
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            match parse_line(line) {
                Some((start, end)) => self.add_busy(start, end),
                None => self.bad_lines += 1,
            }
        }
        Ok(())
    }

    /// Records a busy interval (the part before `next_start` is already reported and dropped).
    fn add_busy(&mut self, start: u64, end: u64) {
        let start = start.max(self.next_start);
        if end <= start {
            return;
        }
        let at = self.busy.partition_point(|&(s, _)| s < start);
        self.busy.insert(at, (start, end));
        // Merge overlapping or touching neighbours.
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.busy.len());
        for &(s, e) in &self.busy {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.busy = merged;
    }

    /// Emits the whole periods that end at or before `until_ns`, then (when `partial_tail`) a
    /// shorter last period up to `until_ns`.
    fn samples_until(&mut self, until_ns: u64, partial_tail: bool) -> Vec<UtilSample> {
        let mut out = Vec::new();
        loop {
            let start = self.next_start;
            let full_end = start.saturating_add(self.period_ns);
            let end = if full_end <= until_ns {
                full_end
            } else if partial_tail && start < until_ns {
                until_ns
            } else {
                break;
            };
            let busy: u64 = self
                .busy
                .iter()
                .take_while(|&&(s, _)| s < end)
                .map(|&(s, e)| e.min(end).saturating_sub(s.max(start)))
                .sum();
            let period_ns = end - start;
            out.push(UtilSample {
                end_ns: end,
                period_ns,
                util: (busy as f64 / period_ns as f64).clamp(0.0, 1.0),
            });
            self.next_start = end;
            self.busy.retain(|&(_, e)| e > end);
        }
        out
    }

    fn reading(&mut self, until_ns: u64, partial_tail: bool) -> GpuReading {
        let mut r = GpuReading::empty(self.info.clone());
        if let Err(e) = self.read_new() {
            // Without the file's news, idle periods could be wrong: report nothing this time.
            r.stale = Some(format!("simulated GPU: {e}"));
            return r;
        }
        r.samples = self.samples_until(until_ns, partial_tail);
        // Synthetic health figures, so that every dashboard panel has something to show in the
        // demo; the source is labelled "simulated" everywhere (stallmon_gpu_simulated = 1).
        let util = r.samples.last().map_or(0.0, |s| s.util);
        self.busy_total_ns += r
            .samples
            .iter()
            .map(|s| (s.util * s.period_ns as f64) as u64)
            .sum::<u64>();
        r.memory_total_bytes = Some(80 << 30);
        r.memory_used_bytes = Some((8 << 30) + ((util * (60u64 << 30) as f64) as u64));
        r.temperature_c = Some(35.0 + 40.0 * util);
        r.power_w = Some(70.0 + 500.0 * util);
        // As if each busy second moved 2 GB in and 0.5 GB out over PCIe.
        let busy_s = self.busy_total_ns as f64 * 1e-9;
        r.pcie_rx_bytes = Some((busy_s * 2e9) as u64);
        r.pcie_tx_bytes = Some((busy_s * 5e8) as u64);
        r.throttle_reasons = vec![("gpu_idle", util < 0.05), ("sw_power_cap", false)];
        r
    }
}

/// Parses `<start_ns> <end_ns>` with `start < end`.
fn parse_line(line: &str) -> Option<(u64, u64)> {
    let mut it = line.split_whitespace();
    let start = it.next()?.parse().ok()?;
    let end = it.next()?.parse().ok()?;
    (it.next().is_none() && start < end).then_some((start, end))
}

impl GpuSampler for SimulatedGpu {
    fn source(&self) -> &'static str {
        "simulated"
    }

    fn poll(&mut self) -> Vec<GpuReading> {
        let until = super::monotonic_ns().saturating_sub(self.lag_ns);
        vec![self.reading(until, false)]
    }

    fn drain(&mut self) -> Vec<GpuReading> {
        vec![self.reading(super::monotonic_ns(), true)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const MS: u64 = 1_000_000;

    struct TempFile(PathBuf);
    impl TempFile {
        fn new(name: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("stallmon-sim-{}-{name}", std::process::id()));
            let _ = std::fs::remove_file(&p);
            Self(p)
        }
        fn append(&self, text: &str) {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.0)
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn utils(s: &[UtilSample]) -> Vec<f64> {
        s.iter()
            .map(|s| (s.util * 1000.0).round() / 1000.0)
            .collect()
    }

    #[test]
    fn timeline_becomes_fixed_periods() {
        let f = TempFile::new("periods");
        let mut g = SimulatedGpu::with_timing(&f.0, 1000 * MS, 100 * MS, 0);
        assert_eq!(g.source(), "simulated");
        // No file yet: the GPU is idle.
        let r = g.reading(1100 * MS, false);
        assert!(r.stale.is_none());
        assert_eq!(utils(&r.samples), [0.0]);
        assert_eq!(r.info.uuid, "SIMULATED-GPU-0");

        f.append(&format!("{} {}\n", 1120 * MS, 1170 * MS));
        f.append(&format!("{} {}\n{} ", 1180 * MS, 1250 * MS, 1290 * MS)); // partial line
        let r = g.reading(1300 * MS, false);
        assert_eq!(utils(&r.samples), [0.7, 0.5]);
        assert_eq!(r.samples[0].end_ns, 1200 * MS);
        assert_eq!(r.samples[1].start_ns(), 1200 * MS);
        assert_eq!(r.samples[1].period_ns, 100 * MS);

        f.append(&format!("{}\n", 1310 * MS)); // completes [1290, 1310)
        let r = g.reading(1400 * MS, false);
        // The interval finished after its period was emitted: the late part is lost, only
        // [1300, 1310) counts.
        assert_eq!(utils(&r.samples), [0.1]);
        assert_eq!(g.bad_lines(), 0);
    }

    #[test]
    fn lag_holds_back_recent_periods_and_drain_emits_them() {
        let f = TempFile::new("lag");
        f.append(&format!("{} {}\n", 10 * MS, 60 * MS));
        let mut g = SimulatedGpu::with_timing(&f.0, 0, 100 * MS, 0);
        assert!(g.reading(99 * MS, false).samples.is_empty());
        let r = g.reading(130 * MS, true);
        assert_eq!(utils(&r.samples), [0.5, 0.0]);
        assert_eq!(r.samples[1].period_ns, 30 * MS);
        let total: u64 = r.samples.iter().map(|s| s.period_ns).sum();
        assert_eq!(total, 130 * MS);
    }

    #[test]
    fn bad_lines_overlaps_and_truncation() {
        let f = TempFile::new("bad");
        f.append("garbage\n5 3\n1 2 3\n\n");
        f.append(&format!(
            "{} {}\n{} {}\n",
            20 * MS,
            60 * MS,
            40 * MS,
            80 * MS
        ));
        let mut g = SimulatedGpu::with_timing(&f.0, 0, 100 * MS, 0);
        let r = g.reading(100 * MS, false);
        assert_eq!(g.bad_lines(), 3);
        assert_eq!(utils(&r.samples), [0.6], "overlapping steps are merged");

        // The workload restarts and rewrites the file: it is read from the start again.
        std::fs::write(&f.0, format!("{} {}\n", 100 * MS, 200 * MS)).unwrap();
        let r = g.reading(200 * MS, false);
        assert_eq!(utils(&r.samples), [1.0]);
    }

    #[test]
    fn unreadable_path_is_stale_not_panic() {
        let dir = std::env::temp_dir(); // a directory: open works, read fails
        let mut g = SimulatedGpu::with_timing(&dir, 0, 100 * MS, 0);
        let r = g.reading(100 * MS, false);
        assert!(r.stale.is_some());
        assert!(r.samples.is_empty());
    }

    #[test]
    fn real_clock_poll_works() {
        let f = TempFile::new("poll");
        let mut g = SimulatedGpu::with_timing(&f.0, crate::gpu::monotonic_ns(), 1000 * MS, 0);
        assert_eq!(g.poll().len(), 1);
        let r = g.drain();
        assert!(r[0].samples.iter().all(|s| s.util == 0.0));
    }
}
