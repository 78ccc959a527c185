//! The attribution scenarios' common parts: the training-loop imitation's dataset and command
//! line, its simulated GPU, the truth it writes and how stallmon's figures are compared with it
//! (see tests/tests/attribution.rs for the method).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

use crate::{gpu::StandinGpus, job, python, scratch_dir, stallmon_bin, workload};

pub const CAUSES: [&str; 4] = ["io", "preprocess", "host", "other"];
/// Allowed error of each cause, as a fraction of the true total idle time.
pub const TOLERANCE: f64 = 0.10;
pub const DATA_FILES: &str = "200";
pub const FILE_KIB: &str = "256";

/// The shared dataset (200 files of 256 KiB), created outside any trace, then either evicted
/// from the page cache (`warm == false`: only the dataset's pages, not the interpreter's) or read
/// once so that the page cache holds it.
pub fn dataset(warm: bool) -> PathBuf {
    let dir = scratch_dir("attribution-data");
    let status = Command::new(python())
        .arg(workload("trainloop.py"))
        .args(["--prepare", "--data"])
        .arg(&dir)
        .args(["--files", DATA_FILES, "--file-kib", FILE_KIB])
        .args(if warm { None } else { Some("--uncached") })
        .status()
        .expect("running trainloop.py --prepare");
    assert!(status.success(), "preparing the dataset failed: {status}");
    if warm {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "bin") {
                std::fs::read(&p).unwrap();
            }
        }
    }
    dir
}

/// A scenario's output files (removed before the run) and its simulated GPU.
pub struct Outputs {
    pub gpus: StandinGpus,
    pub truth: PathBuf,
    pub record: PathBuf,
}

pub fn outputs(name: &str) -> Outputs {
    let dir = scratch_dir(&format!("attribution-{name}"));
    let o = Outputs {
        // NVML-like sampling: 100 ms periods, published 200 ms after they end.
        gpus: StandinGpus::new(&format!("attribution-{name}"), 1, 100, 200),
        truth: dir.join("truth.json"),
        record: dir.join("record.jsonl"),
    };
    for p in [&o.truth, &o.record] {
        let _ = std::fs::remove_file(p);
    }
    o
}

/// trainloop.py as the operations tests run it (alerting, Zabbix): 4 workers, 4 files per
/// batch, 1 ms of CPU per file, 60 ms GPU steps on stand-in GPU 0 of `gpus`, for `seconds`;
/// `uncached`: every file evicted after reading (storage-bound under a throttle).
pub fn operations_job(
    data: &Path,
    gpus: &StandinGpus,
    seconds: u32,
    uncached: bool,
) -> Vec<String> {
    let mut v: Vec<String> = vec![
        python().display().to_string(),
        workload("trainloop.py").display().to_string(),
        "--data".into(),
        data.display().to_string(),
        "--files".into(),
        DATA_FILES.into(),
        "--file-kib".into(),
        FILE_KIB.into(),
        "--workers".into(),
        "4".into(),
        "--batch-files".into(),
        "4".into(),
        "--cpu-ms".into(),
        "1".into(),
        "--gpu-ms".into(),
        "60".into(),
        "--seconds".into(),
        seconds.to_string(),
        "--gpu-dir".into(),
        gpus.path().display().to_string(),
    ];
    if uncached {
        v.push("--uncached".into());
    }
    v
}

/// The trainloop.py command line.
pub fn trainloop_argv(data: &Path, out: &Outputs, args: &[&str]) -> Vec<String> {
    let mut v = vec![
        python().display().to_string(),
        workload("trainloop.py").display().to_string(),
        "--data".into(),
        data.display().to_string(),
        "--files".into(),
        DATA_FILES.into(),
        "--file-kib".into(),
        FILE_KIB.into(),
        "--gpu-dir".into(),
        out.gpus.path().display().to_string(),
        "--truth".into(),
        out.truth.display().to_string(),
    ];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// Figures of one GPU: wall, busy, idle per cause (seconds).
#[derive(Clone, Copy, Debug)]
pub struct Figures {
    pub wall: f64,
    pub busy: f64,
    pub idle: [f64; 4],
}

impl Figures {
    pub fn idle_total(&self) -> f64 {
        self.idle.iter().sum()
    }

    pub fn dominant(&self) -> usize {
        (0..4)
            .max_by(|&a, &b| self.idle[a].total_cmp(&self.idle[b]))
            .unwrap()
    }

    pub fn from_summary_gpu(g: &Value) -> Self {
        let num = |v: &Value| v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
        Self {
            wall: num(&g["wall_seconds"]),
            busy: num(&g["busy_seconds"]),
            idle: CAUSES.map(|c| num(&g["idle_seconds"][c])),
        }
    }
}

/// First and last instant of the simulated GPU timeline in a record file (ns).
pub fn gpu_timeline_bounds(record: &Path) -> (u64, u64) {
    gpu_bounds(record, None)
}

/// The same for one GPU of a record with several.
pub fn gpu_bounds(record: &Path, gpu: Option<u64>) -> (u64, u64) {
    let text = std::fs::read_to_string(record).unwrap();
    let (mut g0, mut g1) = (u64::MAX, 0u64);
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        if v["type"] != "gpu" || gpu.is_some_and(|g| v["gpu"] != g) {
            continue;
        }
        for s in v["samples"].as_array().unwrap() {
            let end = s[0].as_u64().unwrap();
            let period = s[1].as_u64().unwrap();
            g0 = g0.min(end - period);
            g1 = g1.max(end);
        }
    }
    assert!(g1 > g0, "no GPU samples in {}", record.display());
    (g0, g1)
}

/// The workload's truth completed with the edges of stallmon's GPU timeline (see the module doc).
/// Returns (truth, start-up edge, exit edge) in seconds.
pub fn complete_truth(truth: &Value, (g0, g1): (u64, u64)) -> (Figures, f64, f64) {
    let t0 = truth["t0_ns"].as_u64().unwrap();
    let t1 = truth["t1_ns"].as_u64().unwrap();
    assert!(
        g0 <= t0 && t1 <= g1,
        "the workload's timeline [{t0}, {t1}] is not inside stallmon's GPU timeline [{g0}, {g1}]"
    );
    let head = (t0 - g0) as f64 * 1e-9;
    let tail = (g1 - t1) as f64 * 1e-9;
    // Of the start-up edge, the time the feeder spent runnable but waiting for a CPU (its whole
    // run-queue delay so far, almost all of it after the release: the thread only ran briefly
    // before) is other, the rest host.
    let queued = truth["t0_run_delay_ns"]
        .as_u64()
        .map_or(0.0, |ns| (ns as f64 * 1e-9).min(head));
    let mut idle = CAUSES.map(|c| truth["idle_s"][c].as_f64().unwrap());
    idle[2] += head - queued;
    idle[3] += queued + tail;
    let f = Figures {
        wall: (g1 - g0) as f64 * 1e-9,
        busy: truth["busy_s"].as_f64().unwrap(),
        idle,
    };
    (f, head, tail)
}

pub fn table(name: &str, live: &Figures, truth: &Figures, head: f64, tail: f64) -> String {
    let total = truth.idle_total();
    let mut s = format!(
        "\n== {name}: wall {:.3} s, busy {:.3} s (true {:.3} s), idle {:.3} s (true {:.3} s); \
         start-up edge {:.3} s, exit edge {:.3} s (other)\n",
        live.wall,
        live.busy,
        truth.busy,
        live.idle_total(),
        total,
        head,
        tail
    );
    s.push_str(&format!(
        "{:<12}{:>14}{:>10}{:>16}\n",
        "cause", "attributed s", "true s", "error % idle"
    ));
    for (i, c) in CAUSES.iter().enumerate() {
        s.push_str(&format!(
            "{:<12}{:>14.3}{:>10.3}{:>15.1}%\n",
            c,
            live.idle[i],
            truth.idle[i],
            100.0 * (live.idle[i] - truth.idle[i]) / total
        ));
    }
    s
}

/// `stallmon report RECORD --json` gives the live GPU figures again.
pub fn check_report_reproduces(record: &Path, live_gpus: &[Value]) {
    let out = Command::new(stallmon_bin())
        .arg("report")
        .arg(record)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stallmon report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "report output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let replayed = job(&v)["gpu"].as_array().expect("report has a gpu array");
    assert_eq!(replayed.len(), live_gpus.len(), "GPUs in report vs live");
    for (a, b) in live_gpus.iter().zip(replayed) {
        assert_eq!(a["gpu"], b["gpu"]);
        assert_eq!(a["samples"], b["samples"]);
        let (x, y) = (Figures::from_summary_gpu(a), Figures::from_summary_gpu(b));
        let pairs = [(x.wall, y.wall), (x.busy, y.busy)]
            .into_iter()
            .chain(x.idle.into_iter().zip(y.idle));
        for (p, q) in pairs {
            assert!(
                (p - q).abs() <= 1e-6 * p.abs().max(q.abs()) + 1e-12,
                "report does not reproduce the live totals: live {a} vs report {b}"
            );
        }
    }
}

/// Every cause within TOLERANCE x the true total idle time.
pub fn check_bounds(name: &str, live: &Figures, truth: &Figures) {
    let total = truth.idle_total();
    let bound = TOLERANCE * total;
    let bad: Vec<String> = (0..4)
        .filter(|&i| (live.idle[i] - truth.idle[i]).abs() > bound)
        .map(|i| {
            format!(
                "{}: attributed {:.3} s, true {:.3} s (|error| {:.3} s > {:.3} s)",
                CAUSES[i],
                live.idle[i],
                truth.idle[i],
                (live.idle[i] - truth.idle[i]).abs(),
                bound
            )
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{name}: attribution outside 10% of the true idle time ({total:.3} s): {}",
        bad.join("; ")
    );
}

pub fn check_dominant(name: &str, live: &Figures, truth: &Figures, cause: usize) {
    assert_eq!(
        CAUSES[truth.dominant()],
        CAUSES[cause],
        "{name}: the workload's own truth is not {}-dominated: {truth:?}",
        CAUSES[cause]
    );
    assert_eq!(
        CAUSES[live.dominant()],
        CAUSES[cause],
        "{name}: dominant attributed cause: {live:?}"
    );
}
