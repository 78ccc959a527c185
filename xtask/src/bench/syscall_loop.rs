//! Phase 2: a syscall-bound loop (`xtask/bench/readloop.c`): 4 KiB `read(2)` calls from the page
//! cache, timed inside the process (wall and CPU of the loop only), under every [`Variant`].
use std::{collections::HashMap, time::Duration};

use anyhow::{Result, anyhow, ensure};
use serde::{Deserialize, Serialize};

use super::{Bench, Rounds, Variant};

/// One readloop run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopRun {
    pub ns_per_read: f64,
    pub cpu_ns_per_read: f64,
}

pub const LOOP_TIMEOUT: Duration = Duration::from_secs(120);

impl Bench {
    /// `readloop FILE COUNT MODE` (`read`: read(2) only; `mix`: every read-family call).
    pub fn readloop_argv(&self, mode: &str, reads: u64) -> Vec<String> {
        vec![
            self.readloop.display().to_string(),
            self.cache_file.display().to_string(),
            reads.to_string(),
            mode.into(),
        ]
    }

    pub fn phase_loop(&mut self) -> Result<Rounds<LoopRun>> {
        let reads = self.cfg.loop_reads;
        // Warm-up: the file into the page cache, the binary into memory.
        self.loop_once(Variant::Baseline, reads / 4)?;
        let rounds = self.cfg.loop_rounds;
        self.interleaved(
            "loop",
            &Variant::ALL,
            rounds,
            Duration::from_millis(200),
            |b, v, _| b.loop_once(v, reads),
            |run| {
                format!(
                    "{:>7.1} ns/read, CPU {:>7.1} ns/read",
                    run.ns_per_read, run.cpu_ns_per_read
                )
            },
        )
    }

    fn loop_once(&self, v: Variant, reads: u64) -> Result<LoopRun> {
        let out = self.under(v, &self.readloop_argv("read", reads), LOOP_TIMEOUT)?;
        parse_readloop(&out)
    }
}

/// Parses `reads=N wall_ns=W cpu_ns=C`.
pub fn parse_readloop(out: &str) -> Result<LoopRun> {
    let line = out
        .lines()
        .find(|l| l.starts_with("reads="))
        .ok_or_else(|| anyhow!("readloop printed no result: {out:?}"))?;
    let mut kv = HashMap::new();
    for part in line.split_whitespace() {
        if let Some((k, v)) = part.split_once('=') {
            kv.insert(k, v.parse::<f64>().ok());
        }
    }
    let get = |k: &str| {
        kv.get(k)
            .copied()
            .flatten()
            .ok_or_else(|| anyhow!("readloop result lacks {k}: {line}"))
    };
    let (n, wall, cpu) = (get("reads")?, get("wall_ns")?, get("cpu_ns")?);
    ensure!(n > 0.0 && wall > 0.0, "readloop result is empty: {line}");
    Ok(LoopRun {
        ns_per_read: wall / n,
        cpu_ns_per_read: cpu / n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readloop_output() {
        let r = parse_readloop("reads=1000 wall_ns=500000 cpu_ns=400000\n").unwrap();
        assert_eq!(r.ns_per_read, 500.0);
        assert_eq!(r.cpu_ns_per_read, 400.0);
        assert!(parse_readloop("nothing").is_err());
    }
}
