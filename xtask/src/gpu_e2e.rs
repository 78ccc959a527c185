//! `cargo xtask gpu-e2e`: the attribution on real hardware. A real PyTorch training loop on CUDA
//! (`tests/workloads/torch_train.py`: small CNN, DataLoader with 4 workers decoding 2000 raw
//! 3x64x64 image files) runs twice under `stallmon trace --json` with real NVML:
//!
//! 1. **throttled**: the dataset evicted from the page cache (its pages only: dropping every cache
//!    would make the interpreter and PyTorch load through the throttle too), reads from its disk
//!    limited to 8 MiB/s by a blkio cgroup, every read bypassing the cache (`--uncached`);
//! 2. **warm**: the dataset read into the page cache first, no throttle.
//!
//! Both summaries are printed and written to `target/gpu-e2e/{throttled,warm}.json` (record files
//! next to them). The check: the throttled run's dominant idle cause is io, and io's share of the
//! wall time is larger throttled than warm.
//!
//! GPU hosts only: it fails with the reason when `nvidia-smi -L` or `torch.cuda` is unavailable.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::demo::{
    ThrottleGroup, nvidia_gpus, os, python, require_root, target_dir, torch_cuda, workload,
};

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
    let py = python()?;
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
            target_dir().join("release/stallmon")
        }
    };
    if !bin.exists() {
        bail!("stallmon binary {} does not exist", bin.display());
    }
    let out = target_dir().join("gpu-e2e");
    let data = out.join("data");
    std::fs::create_dir_all(&out)?;

    // 1. Throttled storage, dataset not cached.
    prepare(&py, &data, true)?;
    let group = ThrottleGroup::create("stallmon-gpu-e2e", &data, THROTTLE_BPS)?;
    let throttled = trace(&bin, &py, &data, &out, "throttled", Some(&group))?;
    drop(group);

    // 2. Page cache warm, no throttle.
    prepare(&py, &data, false)?;
    warm(&data)?;
    let warm = trace(&bin, &py, &data, &out, "warm", None)?;

    for (name, s) in [("throttled", &throttled), ("warm", &warm)] {
        println!("===== {name} =====\n{}", serde_json::to_string_pretty(s)?);
    }
    let shares = |s: &Value| -> Result<(f64, [f64; 4])> {
        let g = s["gpu"]
            .as_array()
            .and_then(|a| a.first())
            .with_context(|| {
                format!(
                    "no GPU attributed (gpu_disabled: {}, verdicts: {})",
                    s["gpu_disabled"], s["gpu_verdicts"]
                )
            })?;
        let wall = g["wall_seconds"].as_f64().unwrap_or(0.0);
        let idle = CAUSES.map(|c| g["idle_seconds"][c].as_f64().unwrap_or(0.0));
        Ok((wall, idle))
    };
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
    for (name, s) in [("throttled", &throttled), ("warm", &warm)] {
        for v in s["gpu_verdicts"].as_array().into_iter().flatten() {
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
    println!("gpu-e2e: OK (throttled storage -> io; warm page cache -> less io)");
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

/// One traced run; returns the JSON summary (also written to OUT/NAME.json).
fn trace(
    bin: &Path,
    py: &Path,
    data: &Path,
    out: &Path,
    name: &str,
    group: Option<&ThrottleGroup>,
) -> Result<Value> {
    let record = out.join(format!("{name}-record.jsonl"));
    let mut job = vec![py.as_os_str().to_owned(), workload("torch_train.py").into()];
    job.extend(os(&["--data"]));
    job.push(data.into());
    job.extend(os(&[
        "--files",
        FILES,
        "--workers",
        "4",
        "--seconds",
        SECONDS,
    ]));
    if group.is_some() {
        job.extend(os(&["--uncached"]));
    }
    let job = match group {
        Some(g) => g.wrap(job),
        None => job,
    };
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
