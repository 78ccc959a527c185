//! `cargo xtask gpu-e2e`: the attribution on real hardware. A real PyTorch training loop on CUDA
//! (`tests/workloads/torch_train.py`: small CNN, DataLoader with 4 workers decoding 2000 raw
//! 3x64x64 image files) runs under `stallmon trace --json` with real NVML:
//!
//! 1. **throttled**: the dataset evicted from the page cache (its pages only: dropping every cache
//!    would make the interpreter and PyTorch load through the throttle too), reads from its disk
//!    limited to 8 MiB/s by a blkio cgroup (`tests::SlowDisk`), every read bypassing the cache
//!    (`--uncached`);
//! 2. **warm**: the dataset read into the page cache first, no throttle;
//! 3. **two ranks**: real torchrun (`python -m torch.distributed.run --nproc_per_node 2`, both
//!    ranks on GPU 0 unless there are two GPUs, DistributedDataParallel) on the warm dataset.
//!
//! Summaries are printed and written to `target/gpu-e2e/{throttled,warm,two-ranks}.json`
//! (record files next to them). The checks: the throttled run's dominant idle cause is io, and
//! io's share of the wall time is larger throttled than warm; the two-rank run has two ranks, 0
//! and 1, each with its feeder found, and a GPU verdict.
//!
//! GPU hosts only: it fails with the reason when `nvidia-smi -L` or `torch.cuda` is unavailable.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tests::{python, workload};

use crate::demo::{nvidia_gpus, require_root, slow_disk, torch_cuda};

const THROTTLE_BPS: u64 = 8 << 20;
const SECONDS: &str = "40";
const FILES: &str = "2000";
const CAUSES: [&str; 4] = ["io", "preprocess", "host", "other"];

pub fn gpu_e2e(bin: Option<PathBuf>) -> Result<()> {
    let gpus = nvidia_gpus().map_err(|why| {
        anyhow::anyhow!(
            "gpu-e2e needs an NVIDIA GPU and its driver: {why}. Run it on a GPU host \
             (the simulated-GPU validation is `cargo test -p tests --test attribution`)"
        )
    })?;
    let py = python();
    let torch = torch_cuda(&py).map_err(|why| {
        anyhow::anyhow!(
            "gpu-e2e needs PyTorch with CUDA in {} ({why}); it installs nothing",
            py.display()
        )
    })?;
    require_root("cargo xtask gpu-e2e")?;
    eprintln!("gpu-e2e: {gpus}\ngpu-e2e: {torch}");

    let bin = match bin {
        Some(b) => b,
        None => {
            crate::run(crate::cargo().args(["build", "--release", "-p", "monitor-userspace"]))?;
            crate::target_dir().join("release/stallmon")
        }
    };
    if !bin.exists() {
        bail!("stallmon binary {} does not exist", bin.display());
    }
    let out = crate::target_dir().join("gpu-e2e");
    let data = out.join("data");
    std::fs::create_dir_all(&out)?;
    let train = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            py.display().to_string(),
            workload("torch_train.py").display().to_string(),
            "--data".into(),
            data.display().to_string(),
            "--files".into(),
            FILES.into(),
            "--seconds".into(),
            SECONDS.into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    // 1. Throttled storage, dataset not cached.
    prepare(&py, &data, true)?;
    let slow = slow_disk("stallmon-gpu-e2e", &data, THROTTLE_BPS)?;
    let throttled = trace(
        &bin,
        &out,
        "throttled",
        slow.wrap(&train(&["--workers", "4", "--uncached"])),
    )?;
    drop(slow);

    // 2. Page cache warm, no throttle.
    prepare(&py, &data, false)?;
    warm(&data)?;
    let warm = trace(&bin, &out, "warm", train(&["--workers", "4"]))?;

    // 3. Two ranks under torchrun, sharing the GPU (DDP: gloo when they share one).
    let mut two = vec![
        py.display().to_string(),
        "-m".into(),
        "torch.distributed.run".into(),
        "--standalone".into(),
        "--nproc_per_node".into(),
        "2".into(),
    ];
    two.extend(train(&["--workers", "2", "--ddp"]).into_iter().skip(1));
    let ranks = trace(&bin, &out, "two-ranks", two)?;

    for (name, s) in [
        ("throttled", &throttled),
        ("warm", &warm),
        ("two-ranks", &ranks),
    ] {
        println!("===== {name} =====\n{}", serde_json::to_string_pretty(s)?);
    }
    let (tw, ti) = shares(&throttled)?;
    let (ww, wi) = shares(&warm)?;
    println!(
        "\n{:<12}{:>16}{:>16}",
        "idle cause", "throttled % wall", "warm % wall"
    );
    for (i, c) in CAUSES.iter().enumerate() {
        println!(
            "{c:<12}{:>15.1}%{:>15.1}%",
            100.0 * ti[i] / tw.max(1e-9),
            100.0 * wi[i] / ww.max(1e-9)
        );
    }
    for (name, s) in [
        ("throttled", &throttled),
        ("warm", &warm),
        ("two-ranks", &ranks),
    ] {
        for v in tests::job(s)["gpu_verdicts"]
            .as_array()
            .into_iter()
            .flatten()
        {
            println!("{name}: {}", v.as_str().unwrap_or(""));
        }
    }
    println!("\nsummaries and records in {}", out.display());

    let dominant = (0..4).max_by(|&a, &b| ti[a].total_cmp(&ti[b])).unwrap_or(3);
    if dominant != 0 {
        bail!(
            "throttled run: dominant idle cause is {}, expected io",
            CAUSES[dominant]
        );
    }
    if ti[0] / tw.max(1e-9) <= wi[0] / ww.max(1e-9) {
        bail!("io share of the wall time is not larger with throttled storage than warm");
    }
    check_two_ranks(&ranks)?;
    println!(
        "gpu-e2e: OK (throttled storage -> io; warm page cache -> less io; two ranks, two \
         feeders, GPU verdicts)"
    );
    Ok(())
}

/// Wall time and idle seconds by cause of the job's first attributed GPU.
fn shares(s: &Value) -> Result<(f64, [f64; 4])> {
    let g = tests::job(s)["gpu"]
        .as_array()
        .and_then(|a| a.first())
        .with_context(|| {
            format!(
                "no GPU attributed (gpu_disabled: {}, verdicts: {})",
                s["gpu_disabled"],
                tests::job(s)["gpu_verdicts"]
            )
        })?;
    let wall = g["wall_seconds"].as_f64().unwrap_or(0.0);
    let idle = CAUSES.map(|c| g["idle_seconds"][c].as_f64().unwrap_or(0.0));
    Ok((wall, idle))
}

/// Ranks 0 and 1, each with a feeder; a GPU verdict; every attributed GPU and rank printed.
fn check_two_ranks(s: &Value) -> Result<()> {
    let job = tests::job(s);
    let ranks = job["ranks"].as_array().cloned().unwrap_or_default();
    for r in &ranks {
        let feeders: Vec<String> = r["feeders"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| format!("PID {} ({}): {}", f["pid"], f["comm"], f["why"]))
            .collect();
        println!("two-ranks: rank {}: feeders {feeders:?}", r["rank"]);
    }
    for g in job["gpu"].as_array().into_iter().flatten() {
        println!(
            "two-ranks: GPU {} rank {}: busy {:.1} s of {:.1} s, idle {}",
            g["gpu"],
            g["rank"],
            g["busy_seconds"].as_f64().unwrap_or(0.0),
            g["wall_seconds"].as_f64().unwrap_or(0.0),
            g["idle_seconds"]
        );
    }
    for want in ["0", "1"] {
        let found = ranks.iter().any(|r| {
            r["rank"].as_str() == Some(want)
                && r["feeders"].as_array().is_some_and(|f| !f.is_empty())
        });
        if !found {
            bail!("two-rank run: no rank {want} with a feeder (ranks: {ranks:?})");
        }
    }
    if job["gpu_verdicts"].as_array().is_none_or(|v| v.is_empty()) {
        bail!(
            "two-rank run: no GPU verdict (gpu_disabled: {})",
            s["gpu_disabled"]
        );
    }
    Ok(())
}

/// Creates the dataset if needed; `evict` drops its pages from the page cache.
fn prepare(py: &Path, data: &Path, evict: bool) -> Result<()> {
    let mut cmd = Command::new(py);
    cmd.arg(workload("torch_train.py"))
        .args(["--prepare", "--files", FILES, "--data"])
        .arg(data);
    if evict {
        cmd.arg("--uncached");
    }
    crate::run(&mut cmd)
}

/// Reads every file of the dataset once (into the page cache).
fn warm(data: &Path) -> Result<()> {
    for e in std::fs::read_dir(data)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "u8") {
            std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        }
    }
    Ok(())
}

/// One traced run of `job`; returns the JSON summary (also written to OUT/NAME.json).
fn trace(bin: &Path, out: &Path, name: &str, job: Vec<String>) -> Result<Value> {
    let record = out.join(format!("{name}-record.jsonl"));
    // stallmon refuses to overwrite a record file.
    let _ = std::fs::remove_file(&record);
    let mut cmd = Command::new(bin);
    cmd.args(["trace", "--listen", "127.0.0.1:0", "--json", "--record"])
        .arg(&record)
        .args(["--job-name", &format!("gpu-e2e-{name}")])
        .arg("--")
        .args(job)
        .stderr(Stdio::inherit());
    eprintln!("\ngpu-e2e: {name} run: {cmd:?}");
    let o = cmd
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !o.status.success() {
        bail!("{name} run failed: {}", o.status);
    }
    let summary: Value = serde_json::from_slice(&o.stdout).with_context(|| {
        format!(
            "{name}: stdout is not a JSON summary: {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })?;
    let path = out.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(summary)
}
