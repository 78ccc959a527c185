//! `stallmon report FILE`: recomputes the attribution from a record file.
//!
//! The record file is JSON lines tagged with `"type"`. The attribution-relevant lines
//! ([`AttributionRecord`]: `feeder`, `worker_slice`, `gpu`) are fed, in file order, through the same
//! [`Attributor`] the live daemon used, so the result equals the live totals; other types are
//! ignored.

use std::collections::BTreeMap;
use std::io::BufRead;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::attribution::{AttributionRecord, Attributor, AttributorConfig, GpuTotals};

/// Identity of a GPU as recorded in its `gpu` lines (last one wins).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuLabel {
    pub uuid: String,
    pub model: String,
    /// `"nvml"` or `"simulated"`, when recorded.
    pub source: Option<String>,
}

/// The outcome of a recomputation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recomputed {
    /// Per GPU, by index.
    pub totals: Vec<GpuTotals>,
    pub gpus: BTreeMap<u32, GpuLabel>,
    /// Attribution records applied.
    pub records: u64,
}

/// Recomputes per-GPU totals from record lines with the default configuration.
pub fn recompute(lines: impl Iterator<Item = Value>) -> Result<Vec<GpuTotals>> {
    Ok(recompute_with(lines, AttributorConfig::default())?.totals)
}

/// Recomputes from record lines with a given configuration (it must match the live daemon's for
/// the totals to match).
pub fn recompute_with(
    lines: impl Iterator<Item = Value>,
    config: AttributorConfig,
) -> Result<Recomputed> {
    let mut r = Recomputer::new(config);
    for (i, value) in lines.enumerate() {
        r.feed(value).with_context(|| format!("record {}", i + 1))?;
    }
    Ok(r.finish())
}

/// Recomputes from a JSON-lines reader (see [`json_lines`] for what is tolerated).
pub fn recompute_reader(reader: impl BufRead, config: AttributorConfig) -> Result<Recomputed> {
    let mut r = Recomputer::new(config);
    for item in json_lines(reader) {
        let (line, value) = item?;
        r.feed(value).with_context(|| format!("line {line}"))?;
    }
    Ok(r.finish())
}

/// Parses JSON lines, yielding `(line number, value)`. Blank lines are skipped. A line that does
/// not parse is an error, unless it is the last line of the input: a daemon killed mid-write
/// leaves a truncated last line, which is dropped with a warning.
pub fn json_lines(reader: impl BufRead) -> impl Iterator<Item = Result<(usize, Value)>> {
    let mut lines = reader.lines().enumerate();
    let mut bad: Option<(usize, serde_json::Error)> = None;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        loop {
            let Some((i, line)) = lines.next() else {
                done = true;
                if let Some((n, e)) = bad.take() {
                    log::warn!("ignoring truncated last record line {n}: {e}");
                }
                return None;
            };
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    done = true;
                    return Some(Err(anyhow::Error::new(e).context(format!("line {}", i + 1))));
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            if let Some((n, e)) = bad.take() {
                done = true;
                return Some(Err(
                    anyhow::Error::new(e).context(format!("line {n}: not JSON"))
                ));
            }
            match serde_json::from_str(&line) {
                Ok(v) => return Some(Ok((i + 1, v))),
                Err(e) => bad = Some((i + 1, e)),
            }
        }
    })
}

/// Feeds record values into an [`Attributor`].
struct Recomputer {
    attributor: Attributor,
    gpus: BTreeMap<u32, GpuLabel>,
    records: u64,
}

impl Recomputer {
    fn new(config: AttributorConfig) -> Self {
        Self {
            attributor: Attributor::new(config),
            gpus: BTreeMap::new(),
            records: 0,
        }
    }

    /// Applies one record line; lines of other types are ignored.
    fn feed(&mut self, value: Value) -> Result<()> {
        let ty = match value.get("type") {
            Some(Value::String(t)) => t.as_str(),
            Some(other) => bail!("\"type\" is not a string: {other}"),
            None => bail!("record without a \"type\""),
        };
        let Some(&ty) = AttributionRecord::TYPES.iter().find(|&&t| t == ty) else {
            return Ok(());
        };
        let record: AttributionRecord =
            serde_json::from_value(value).with_context(|| format!("malformed {ty:?} record"))?;
        if let AttributionRecord::Gpu(g) = &record {
            let label = self.gpus.entry(g.gpu).or_default();
            label.uuid.clone_from(&g.uuid);
            label.model.clone_from(&g.model);
            if g.source.is_some() {
                label.source.clone_from(&g.source);
            }
        }
        self.attributor.apply(&record);
        self.records += 1;
        Ok(())
    }

    fn finish(mut self) -> Recomputed {
        self.attributor.flush();
        Recomputed {
            totals: self.attributor.totals(),
            gpus: self.gpus,
            records: self.records,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::{FeederRecord, GpuRecord, WorkerSlice};
    use crate::gpu::{GpuInfo, UtilSample};

    const MS: u64 = 1_000_000;

    /// xorshift64*: deterministic test randomness.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Simulates the live daemon for `seconds`: every 100 ms a feeder batch, a worker slice and
    /// (lagging ~1 s, ~167 ms periods) GPU samples for two GPUs. Each record is applied to a live
    /// attributor and written as a JSON line, with unrelated lines mixed in.
    fn live_run(seed: u64, seconds: u64) -> (Vec<GpuTotals>, Vec<String>) {
        let mut rng = Rng(seed | 1);
        let mut live = Attributor::new(AttributorConfig::default());
        let mut lines = vec![r#"{"type":"meta","version":1,"pid":1234}"#.to_string()];
        let emit = |rec: AttributionRecord, live: &mut Attributor, lines: &mut Vec<String>| {
            live.apply(&rec);
            lines.push(serde_json::to_string(&rec).unwrap());
        };
        let base = 10_000 * MS;
        let mut feeder_t = base;
        let mut gpu_t = [base; 2];
        let info = |i: u32| GpuInfo {
            index: i,
            uuid: format!("GPU-{i}"),
            model: "test".into(),
        };
        for tick in 1..=seconds * 10 {
            let now = base + tick * 100 * MS;
            let mut events = Vec::new();
            if tick == 1 {
                events.push((base, 0));
            }
            loop {
                feeder_t += rng.below(30 * MS) + 1;
                if feeder_t >= now {
                    feeder_t = now;
                    break;
                }
                events.push((feeder_t, rng.below(4) as u32));
            }
            emit(
                AttributionRecord::Feeder(FeederRecord {
                    events,
                    until_ns: Some(now),
                }),
                &mut live,
                &mut lines,
            );
            let mut state_ns = [0u64; 4];
            for v in &mut state_ns {
                *v = rng.below(300 * MS);
            }
            emit(
                AttributionRecord::WorkerSlice(WorkerSlice {
                    start_ns: now - 100 * MS,
                    end_ns: now,
                    state_ns,
                }),
                &mut live,
                &mut lines,
            );
            if tick % 7 == 0 {
                lines.push(format!(r#"{{"type":"block","dev":"vda","reads":{tick}}}"#));
            }
            for (g, t) in gpu_t.iter_mut().enumerate() {
                let mut samples = Vec::new();
                while *t + 167 * MS + 1000 * MS <= now {
                    *t += 167 * MS;
                    samples.push(UtilSample {
                        end_ns: *t,
                        period_ns: 167 * MS,
                        util: rng.below(1001) as f64 / 1000.0 * (0.1 + g as f64 * 0.3),
                    });
                }
                if !samples.is_empty() {
                    let rec = GpuRecord::new(&info(g as u32), "simulated", &samples);
                    emit(AttributionRecord::Gpu(rec), &mut live, &mut lines);
                }
            }
        }
        live.flush();
        (live.totals(), lines)
    }

    fn assert_close(a: &[GpuTotals], b: &[GpuTotals]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            let tol = 1e-9 * x.wall_s.max(1.0);
            assert_eq!((x.gpu, x.samples), (y.gpu, y.samples));
            assert!((x.wall_s - y.wall_s).abs() < tol, "{x:?} vs {y:?}");
            assert!((x.busy_s - y.busy_s).abs() < tol, "{x:?} vs {y:?}");
            assert!(
                (x.io_feeder_s - y.io_feeder_s).abs() < tol,
                "{x:?} vs {y:?}"
            );
            for (c, d) in x.idle_s.iter().zip(&y.idle_s) {
                assert!((c - d).abs() < tol, "{x:?} vs {y:?}");
            }
        }
    }

    #[test]
    fn recompute_matches_live_streaming() {
        for seed in [1, 42, 0xdead_beef] {
            let (live, lines) = live_run(seed, 20);
            assert_eq!(live.len(), 2);
            assert!(live[0].samples > 100);
            assert!(live[0].idle_s.iter().all(|&c| c > 0.0), "{live:?}");
            let values = lines
                .iter()
                .map(|l| serde_json::from_str::<Value>(l).unwrap());
            let totals = recompute(values).unwrap();
            assert_close(&live, &totals);

            let text = lines.join("\n") + "\n";
            let r = recompute_reader(text.as_bytes(), AttributorConfig::default()).unwrap();
            assert_close(&live, &r.totals);
            assert_eq!(r.gpus[&1].uuid, "GPU-1");
            assert_eq!(r.gpus[&1].source.as_deref(), Some("simulated"));
        }
    }

    #[test]
    fn truncated_last_line_is_tolerated_but_corruption_is_not() {
        let (live, lines) = live_run(7, 5);
        let mut text = lines.join("\n");
        text.push_str("\n\n{\"type\":\"feeder\",\"eve"); // killed mid-write
        let r = recompute_reader(text.as_bytes(), AttributorConfig::default()).unwrap();
        assert_close(&live, &r.totals);

        let mut bad = lines.clone();
        bad.insert(3, "{not json".into());
        let err =
            recompute_reader(bad.join("\n").as_bytes(), AttributorConfig::default()).unwrap_err();
        assert!(format!("{err:#}").contains("line 4"), "{err:#}");
    }

    #[test]
    fn malformed_records_are_errors_and_other_types_are_ignored() {
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        assert!(
            recompute([v(r#"{"type":"whatever","x":1}"#)].into_iter())
                .unwrap()
                .is_empty()
        );
        let err =
            recompute([v(r#"{"type":"gpu","gpu":"zero","samples":[]}"#)].into_iter()).unwrap_err();
        assert!(
            format!("{err:#}").contains("record 1: malformed \"gpu\" record"),
            "{err:#}"
        );
        assert!(recompute([v(r#"{"no_type":1}"#)].into_iter()).is_err());
        assert!(recompute([v(r#"{"type":5}"#)].into_iter()).is_err());
        assert!(recompute([v("[1,2]")].into_iter()).is_err());
    }
}
