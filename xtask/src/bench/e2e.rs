//! Phase 3, end to end: the bundled training-loop imitation (`tests/workloads/trainloop.py`) as
//! a job would run it: 4 worker processes read many small files from the page cache (two
//! `read(2)` calls per 8 KiB file), "decode" them on the CPU, and hand batches to the feeder
//! through a queue. Throughput in samples (files) per second over the job's own timeline, no
//! tracer vs stallmon's default mode vs `--syscalls`, each tracing the job.
use std::{fs, path::PathBuf, time::Duration};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use super::{Bench, Rounds, Variant, summary::E2eWorkload};

/// The job's parameters (trainloop.py flags).
pub const WORKLOAD: E2eWorkload = E2eWorkload {
    workers: 4,
    files: 2000,
    file_kib: 8,
    batch_files: 32,
    cpu_ms_per_file: 0.25,
    gpu_ms: 1.0,
    seconds: 0.0,
};

/// One run, from trainloop.py's truth file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct E2eRun {
    pub batches: u64,
    /// `t1 - t0` of the truth: from the script's first statement to its last instant.
    pub wall_seconds: f64,
    pub batches_per_second: f64,
    pub samples_per_second: f64,
}

/// What the bench reads of trainloop.py's `--truth` document (see its `report()`).
#[derive(Deserialize)]
struct Truth {
    batches: u64,
    wall_s: f64,
}

impl Bench {
    fn e2e_data(&self) -> PathBuf {
        self.dir.join("e2e-data")
    }

    /// Creates the dataset (if needed) and reads it into the page cache.
    pub fn prepare_e2e(&self) -> Result<()> {
        let w = WORKLOAD;
        let data = self.e2e_data();
        crate::run(
            std::process::Command::new(tests::python())
                .arg(tests::workload("trainloop.py"))
                .args(["--prepare", "--data"])
                .arg(&data)
                .args(["--files", &w.files.to_string()])
                .args(["--file-kib", &w.file_kib.to_string()]),
        )
        .context("creating the end-to-end dataset")?;
        for e in fs::read_dir(&data)? {
            let p = e?.path();
            fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        }
        Ok(())
    }

    fn trainloop_argv(&self, truth: &std::path::Path, seconds: f64) -> Vec<String> {
        let w = WORKLOAD;
        vec![
            tests::python().display().to_string(),
            tests::workload("trainloop.py").display().to_string(),
            "--data".into(),
            self.e2e_data().display().to_string(),
            "--files".into(),
            w.files.to_string(),
            "--file-kib".into(),
            w.file_kib.to_string(),
            "--workers".into(),
            w.workers.to_string(),
            "--batch-files".into(),
            w.batch_files.to_string(),
            "--cpu-ms".into(),
            w.cpu_ms_per_file.to_string(),
            "--gpu-ms".into(),
            w.gpu_ms.to_string(),
            "--seconds".into(),
            seconds.to_string(),
            "--truth".into(),
            truth.display().to_string(),
        ]
    }

    pub fn phase_e2e(&mut self) -> Result<Rounds<E2eRun>> {
        // Warm-up: the interpreter and the dataset into memory.
        self.e2e_once(Variant::Baseline, 1.0, "warmup")?;
        let (rounds, secs) = (self.cfg.e2e_rounds, self.cfg.e2e_seconds);
        self.interleaved(
            "e2e",
            &Variant::E2E,
            rounds,
            Duration::from_millis(500),
            |b, v, r| b.e2e_once(v, secs, &format!("{}-{r}", v.key())),
            |run| {
                format!(
                    "{:>6.1} batches/s ({:>7.0} samples/s, {} batches in {:.2} s)",
                    run.batches_per_second, run.samples_per_second, run.batches, run.wall_seconds
                )
            },
        )
    }

    fn e2e_once(&self, v: Variant, seconds: f64, tag: &str) -> Result<E2eRun> {
        let truth = self.dir.join(format!("e2e-{tag}.json"));
        let _ = fs::remove_file(&truth);
        let argv = self.trainloop_argv(&truth, seconds);
        self.under(v, &argv, Duration::from_secs_f64(seconds + 120.0))?;
        let text = fs::read_to_string(&truth)
            .with_context(|| format!("trainloop.py wrote no truth file {}", truth.display()))?;
        let t: Truth =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", truth.display()))?;
        ensure!(
            t.batches > 0 && t.wall_s > 0.0,
            "trainloop.py did no batch ({})",
            truth.display()
        );
        let bps = t.batches as f64 / t.wall_s;
        Ok(E2eRun {
            batches: t.batches,
            wall_seconds: t.wall_s,
            batches_per_second: bps,
            samples_per_second: bps * WORKLOAD.batch_files as f64,
        })
    }
}
