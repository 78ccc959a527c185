//! `stallmon report FILE`: the summary of a record file, rebuilt offline through the same fold
//! (ledger) and the same attribution engines as live tracing. The input is read once, as a
//! stream (`-`, `/dev/stdin` and `<(zcat f)` work). A record cut short (the tracer killed, the
//! host crashed) gives everything up to its last complete line; damaged lines are skipped and
//! counted.
use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    attribution::{Attribution, AttributorConfig},
    ledger::Ledger,
    schema::{
        record::{Item, Line, Reader},
        summary::Summary,
    },
    summary::{self, Context},
};

/// What a record holds.
pub struct Replayed {
    pub summary: Summary,
    pub damaged: u64,
    pub truncated_tail: bool,
}

/// Replays a record from a reader.
pub fn replay(input: impl BufRead) -> Result<Replayed> {
    let mut reader = Reader::new(input);
    let mut ledger = Ledger::new();
    let mut attribution = Attribution::new(AttributorConfig::default());
    let (mut lines, mut damaged) = (0u64, 0u64);
    for item in reader.by_ref() {
        match item {
            Item::Line(line) => {
                if lines == 0 && !matches!(line, Line::Header(_)) {
                    bail!("not a stallmon record file (no header line first)");
                }
                lines += 1;
                attribution.apply(&line);
                ledger.apply(&line);
            }
            Item::Bad(e) => {
                if lines == 0 {
                    return Err(e).context("not a stallmon record file");
                }
                damaged += 1;
                tracing::warn!("skipping a damaged record line: {e}");
            }
        }
    }
    if lines == 0 {
        bail!("empty record (no header line)");
    }
    attribution.flush();
    let header = ledger.header.clone().expect("first line is the header");
    let gpu_disabled = header
        .gpu_source
        .is_none()
        .then(|| "GPU attribution was disabled during the run".to_string());
    let summary = summary::build(
        &ledger,
        &attribution.totals(),
        &Context {
            mode: &header.mode,
            duration_seconds: ledger.covered_seconds(),
            syscalls: header.syscalls,
            gpu_source: header.gpu_source.clone(),
            gpu_disabled,
        },
    );
    Ok(Replayed {
        summary,
        damaged,
        truncated_tail: reader.truncated_tail,
    })
}

/// `stallmon report PATH [--json]`.
pub fn run(path: &Path, json: bool) -> Result<i32> {
    let input: Box<dyn Read> = if path == Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(path)
                .with_context(|| format!("cannot open record file {}", path.display()))?,
        )
    };
    let r = replay(BufReader::new(input)).with_context(|| format!("{}", path.display()))?;
    if r.truncated_tail {
        eprintln!(
            "stallmon: the record ends with an incomplete line (the tracer was stopped mid-write); reporting every complete line"
        );
    }
    if r.damaged > 0 {
        eprintln!("stallmon: {} damaged line(s) skipped", r.damaged);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&r.summary)?);
    } else {
        print!("{}", summary::human(&r.summary));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{
        JobLabels, SparseHist,
        record::{
            BlockDelta, FeederInfo, FeederLine, GpuLine, Header, IntervalLine, JobLine, RankLine,
            RoleDelta, WorkerSliceLine,
        },
    };
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;

    /// A small but complete record: header, job, rank, five intervals with attribution lines.
    fn record() -> Vec<String> {
        let mut lines = vec![
            Line::Header(Header {
                version: 2,
                stallmon: "test".into(),
                revision: String::new(),
                mode: "trace".into(),
                start_mono_ns: 0,
                interval_s: 1.0,
                gpu_source: Some("simulated".into()),
                syscalls: false,
            }),
            Line::Job(JobLine {
                job: 1,
                labels: JobLabels {
                    job_name: "j".into(),
                    ..JobLabels::default()
                },
                root_pid: 7,
                command: vec![],
            }),
            Line::Rank(RankLine {
                slot: 0,
                job: 1,
                rank: "0".into(),
                local_rank: None,
                feeder: FeederInfo {
                    pid: 7,
                    tid: 7,
                    comm: "python".into(),
                    gpus: vec![0],
                    why: "test".into(),
                },
            }),
        ];
        for i in 1..=5u64 {
            let t = i * 1000 * MS;
            lines.push(Line::Feeder(FeederLine {
                slot: 0,
                events: vec![(t - 1000 * MS, 2)],
                until_ns: Some(t),
            }));
            lines.push(Line::WorkerSlice(WorkerSliceLine {
                slot: 0,
                start_ns: t - 1000 * MS,
                end_ns: t,
                state_ns: [0, 2000 * MS, 0, 0, 0],
            }));
            lines.push(Line::Gpu(GpuLine {
                gpu: 0,
                slot: 0,
                samples: vec![(t, 1000 * MS, 0.25)],
                ..GpuLine::default()
            }));
            lines.push(Line::Interval(IntervalLine {
                mono_ns: t,
                dt_ns: 1000 * MS,
                block: vec![BlockDelta {
                    device: "vda".into(),
                    op: "read".into(),
                    requests: 100,
                    bytes: 409_600,
                    latency: SparseHist::from_counts(&[0, 0, 0, 0, 0, 0, 0, 100], 100 * 100_000),
                    ..BlockDelta::default()
                }],
                ranks: vec![RoleDelta {
                    job: 1,
                    rank: "0".into(),
                    role: "worker".into(),
                    state_ns: [1, 2000 * MS, 3, 4, 5],
                    processes: 4,
                    ..RoleDelta::default()
                }],
                drops: vec![0; 10],
                ..IntervalLine::default()
            }));
        }
        lines
            .iter()
            .map(|l| serde_json::to_string(l).unwrap())
            .collect()
    }

    fn requests(s: &Summary) -> u64 {
        s.block.iter().map(|b| b.requests).sum()
    }

    #[test]
    fn a_killed_run_reports_every_complete_interval() {
        let lines = record();
        let full = replay((lines.join("\n") + "\n").as_bytes()).unwrap();
        assert_eq!(requests(&full.summary), 500);
        assert!(full.summary.duration_seconds > 4.9);
        let j = &full.summary.jobs[0];
        assert_eq!(j.gpu.len(), 1);
        assert!(
            (j.gpu[0].idle_seconds.io - 3.75).abs() < 1e-6,
            "{:?}",
            j.gpu[0]
        );
        // Cut inside the last line, as SIGKILL would.
        let mut cut = lines[..lines.len() - 1].join("\n");
        cut.push_str("\n{\"type\":\"interval\",\"mono_ns\":");
        let r = replay(cut.as_bytes()).unwrap();
        assert!(r.truncated_tail);
        assert_eq!(requests(&r.summary), 400);
    }

    #[test]
    fn not_a_record_is_an_error() {
        assert!(replay("".as_bytes()).is_err());
        assert!(replay("hello\n".as_bytes()).is_err());
        assert!(replay("{\"type\":\"interval\"}\n".as_bytes()).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        /// Random bytes never panic the reader.
        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
            let _ = replay(&bytes[..]);
        }

        /// A record cut at any byte, or with one byte changed, never panics, and every complete
        /// line before the damage is used.
        #[test]
        fn truncated_and_mutated_records(cut in 0usize..4000, flip in 0usize..4000, byte in any::<u8>()) {
            let lines = record();
            let text = lines.join("\n") + "\n";
            let cut = cut.min(text.len());
            let prefix = &text.as_bytes()[..cut];
            if let Ok(r) = replay(prefix) {
                let complete = text[..cut].matches('\n').count();
                let expected = lines[..complete.min(lines.len())]
                    .iter()
                    .filter(|l| l.contains("\"interval\""))
                    .count() as u64 * 100;
                prop_assert!(requests(&r.summary) >= expected, "{} < {}", requests(&r.summary), expected);
            }
            let mut mutated = text.into_bytes();
            let i = flip.min(mutated.len() - 1);
            mutated[i] = byte;
            let _ = replay(&mutated[..]);
        }
    }
}
