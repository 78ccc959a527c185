//! `cargo xtask demo`: stallmon on a DataLoader-style job over throttled storage.
//!
//! The bundled job (`tests/workloads/trainloop.py`, 4 worker processes reading 256 KiB files and
//! bypassing the page cache) runs inside a blkio cgroup that throttles reads from the disk holding
//! its dataset to 8 MiB/s (`tests::SlowDisk`), under `target/release/stallmon trace`, which prints
//! its summary and verdict on stderr and writes a record file; then `stallmon report` rebuilds
//! the same summary from the record.
//!
//! With an NVIDIA GPU (`nvidia-smi -L` succeeds) and PyTorch with CUDA importable, the job is
//! `tests/workloads/torch_train.py` on the GPU and stallmon reads the GPU through NVML. Otherwise
//! the GPU is the stand-in NVML library (`tests/nvml-standin`, built here), driven by the job's
//! own "GPU steps" (`trainloop.py --gpu-dir`); stallmon labels everything it reports from it as
//! simulated.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use tests::{SlowDisk, gpu::StandinGpus, python, workload};

/// Read throttle of the demo's blkio group.
const DEMO_BPS: u64 = 8 << 20;
const DEMO_GROUP: &str = "stallmon-demo";

/// `nvidia-smi -L` succeeds and lists a GPU: Ok(list), else Err(why).
pub(crate) fn nvidia_gpus() -> Result<String, String> {
    match Command::new("nvidia-smi").arg("-L").output() {
        Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).contains("GPU") => {
            Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
        }
        Ok(o) => Err(format!(
            "`nvidia-smi -L` failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout).trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("`nvidia-smi` cannot run: {e}")),
    }
}

/// PyTorch imports and sees CUDA: Ok(version line), else Err(why).
pub(crate) fn torch_cuda(python: &Path) -> Result<String, String> {
    let probe = "import sys, torch\n\
                 if not torch.cuda.is_available():\n    sys.exit('torch.cuda.is_available() is False')\n\
                 print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0), 'x', torch.cuda.device_count())";
    match Command::new(python).args(["-c", probe]).output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr)
            .trim()
            .lines()
            .last()
            .unwrap_or("torch probe failed")
            .to_string()),
        Err(e) => Err(format!("cannot run {}: {e}", python.display())),
    }
}

pub(crate) fn require_root(what: &str) -> Result<()> {
    // SAFETY: trivial libc call.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{what} must run as root (eBPF tracing and a blkio cgroup): try `sudo -E cargo xtask ...`"
        );
    }
    Ok(())
}

/// The release binary built by `cargo xtask demo`/`build`.
pub(crate) fn release_bin() -> Result<PathBuf> {
    let bin = crate::target_dir().join("release/stallmon");
    if !bin.exists() {
        bail!(
            "{} is missing: build it with `cargo xtask build`",
            bin.display()
        );
    }
    Ok(bin)
}

/// The blkio group that throttles reads of `data`'s disk (cgroup v1 blkio, see
/// `tests::SlowDisk`), with a message that says what it needs when it cannot be made.
pub(crate) fn slow_disk(name: &str, data: &Path, bps: u64) -> Result<SlowDisk> {
    let slow = SlowDisk::new(name, data, bps).with_context(|| {
        format!(
            "throttling reads of the disk under {} to {} MiB/s (needs root, cgroup v1 blkio at \
             /sys/fs/cgroup/blkio, and the data on a block device)",
            data.display(),
            bps >> 20
        )
    })?;
    let (major, minor) = tests::disk_of(data)?;
    eprintln!(
        "xtask: reads from disk {major}:{minor} (holding {}) throttled to {} MiB/s for the job \
         ({})",
        data.display(),
        bps >> 20,
        slow.dir.display()
    );
    Ok(slow)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

pub fn demo(seconds: u32) -> Result<()> {
    require_root("cargo xtask demo")?;
    let bin = release_bin()?;
    let py = python();
    let target = crate::target_dir();
    let record = target.join("demo-record.jsonl");
    // stallmon refuses to overwrite a record file.
    let _ = std::fs::remove_file(&record);
    let secs = seconds.max(1).to_string();

    // Real GPU only with both NVML (nvidia-smi) and PyTorch on CUDA; else the stand-in.
    let torch = match nvidia_gpus() {
        Ok(gpus) => match torch_cuda(&py) {
            Ok(v) => {
                eprintln!("xtask: NVIDIA GPU found ({gpus}); {v}: running a PyTorch job");
                true
            }
            Err(why) => {
                eprintln!("xtask: NVIDIA GPU found, but PyTorch with CUDA is not usable ({why})");
                false
            }
        },
        Err(_) => false,
    };

    let (data, job, standin) = if torch {
        let data = target.join("demo-data-torch");
        crate::run(
            Command::new(&py)
                .arg(workload("torch_train.py"))
                .args(["--prepare", "--uncached", "--data"])
                .arg(&data),
        )?;
        let job = vec![
            s(&py),
            s(&workload("torch_train.py")),
            "--data".into(),
            s(&data),
            "--workers".into(),
            "4".into(),
            "--uncached".into(),
            "--seconds".into(),
            secs,
        ];
        (data, job, None)
    } else {
        // The stand-in NVML library and one simulated GPU that the job drives.
        crate::run(crate::cargo().args(["build", "-p", "nvml-standin"]))?;
        let gpus = StandinGpus::new("demo", 1, 100, 1000);
        let data = target.join("demo-data");
        crate::run(
            Command::new(&py)
                .arg(workload("trainloop.py"))
                .args(["--prepare", "--uncached", "--data"])
                .arg(&data),
        )?;
        let mut job: Vec<String> = vec![
            s(&py),
            s(&workload("trainloop.py")),
            "--data".into(),
            s(&data),
        ];
        job.extend(
            [
                "--workers",
                "4",
                "--batch-files",
                "4",
                "--cpu-ms",
                "2",
                "--gpu-ms",
                "60",
                "--uncached",
                "--seconds",
                &secs,
                "--gpu-index",
                "0",
                "--gpu-dir",
            ]
            .map(String::from),
        );
        job.push(s(gpus.path()));
        (data, job, Some(gpus))
    };

    let slow = slow_disk(DEMO_GROUP, &data, DEMO_BPS)?;
    if standin.is_some() {
        let why = if nvidia_gpus().is_ok() {
            "PyTorch with CUDA not usable on this machine"
        } else {
            "no NVIDIA GPU on this machine"
        };
        let banner = format!("SIMULATED GPU ({why})");
        let rule = "=".repeat(banner.len() + 8);
        eprintln!("\n{rule}\n    {banner}\n{rule}");
        eprintln!(
            "The GPU below is the stand-in NVML library (tests/nvml-standin), busy exactly during \
             the job's \"GPU steps\"; the job's I/O, worker processes and thread states are real.\n"
        );
    }

    let mut cmd = Command::new(&bin);
    cmd.args([
        "trace",
        "--listen",
        "127.0.0.1:0",
        "--job-name",
        "demo",
        "--record",
    ])
    .arg(&record);
    if let Some(gpus) = &standin {
        cmd.args(gpus.args());
        for (k, v) in gpus.env() {
            cmd.env(k, v);
        }
    }
    cmd.arg("--").args(slow.wrap(&job));
    eprintln!("xtask: running {cmd:?}\n");
    let status = cmd
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    drop(slow);
    if !status.success() {
        bail!("stallmon trace failed: {status}");
    }

    eprintln!(
        "\nxtask: the record file is {rec}; the same attribution, recomputed offline from it:\n\
         xtask: running {bin} report {rec}\n",
        rec = record.display(),
        bin = bin.display()
    );
    crate::run(Command::new(&bin).arg("report").arg(&record))?;
    eprintln!("\nxtask: (add --json to `stallmon report` for machine-readable output)");
    Ok(())
}
