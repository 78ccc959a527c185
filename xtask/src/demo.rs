//! `cargo xtask demo`: stallmon on a DataLoader-style job over throttled storage.
//!
//! The bundled job (`tests/workloads/trainloop.py`, 4 worker processes reading 256 KiB files and
//! bypassing the page cache) runs inside a blkio cgroup that throttles reads from the disk holding
//! its dataset to 8 MiB/s, under `target/release/stallmon trace`, which prints its summary and
//! verdict on stderr and writes a record file for `stallmon report`.
//!
//! With an NVIDIA GPU (`nvidia-smi -L` succeeds) and PyTorch with CUDA importable, the job is
//! `tests/workloads/torch_train.py` on the GPU and stallmon reads the GPU through NVML. Otherwise
//! the GPU is stallmon's simulated one, driven by the job's own "GPU steps", and every output says
//! so.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::setup::repo_root;

/// Read throttle of the demo's blkio group.
const DEMO_BPS: u64 = 8 << 20;
const DEMO_GROUP: &str = "stallmon-demo";

/// The cargo target directory (`$CARGO_TARGET_DIR`, else `target/` in the repository).
pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

pub(crate) fn workload(name: &str) -> PathBuf {
    repo_root().join("tests/workloads").join(name)
}

/// The real Python interpreter (a pyenv shim would fork helpers that become part of the job).
pub(crate) fn python() -> Result<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .context("python3 is required (running `python3 -c ...` failed)")?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || path.is_empty() {
        bail!(
            "python3 did not report its executable: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(PathBuf::from(path))
}

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
                 print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))";
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

/// `major:minor` of the whole disk holding `path`'s filesystem.
pub(crate) fn disk_of(path: &Path) -> Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let real = std::fs::canonicalize(&sys).with_context(|| {
        format!(
            "{} is on device {major}:{minor}, which is not a block device (tmpfs, overlay?): \
             put the data on a disk",
            path.display()
        )
    })?;
    let disk = if real.join("partition").exists() {
        real.parent()
            .context("partition without a disk")?
            .to_path_buf()
    } else {
        real
    };
    let devno = std::fs::read_to_string(disk.join("dev"))?;
    let (a, b) = devno.trim().split_once(':').context("bad dev file")?;
    Ok((a.parse()?, b.parse()?))
}

/// A cgroup that throttles reads from one disk (cgroup v1 `blkio`, else cgroup v2 `io.max`),
/// removed on drop (also when the demo fails half-way).
pub(crate) struct ThrottleGroup {
    dir: PathBuf,
}

impl ThrottleGroup {
    /// Limits reads from the disk holding `data` to `bytes_per_sec` for the group's processes.
    pub(crate) fn create(name: &str, data: &Path, bytes_per_sec: u64) -> Result<Self> {
        let (major, minor) = disk_of(data)?;
        let v1 = Path::new("/sys/fs/cgroup/blkio");
        let v2 = Path::new("/sys/fs/cgroup");
        let (dir, file, line) = if v1.join("blkio.throttle.read_bps_device").exists() {
            (
                v1.join(name),
                "blkio.throttle.read_bps_device",
                format!("{major}:{minor} {bytes_per_sec}"),
            )
        } else if std::fs::read_to_string(v2.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "io"))
        {
            // cgroup v2: the io controller must be enabled for the root's children.
            let _ = std::fs::write(v2.join("cgroup.subtree_control"), "+io");
            (
                v2.join(name),
                "io.max",
                format!("{major}:{minor} rbps={bytes_per_sec}"),
            )
        } else {
            bail!(
                "no cgroup blkio controller (v1 /sys/fs/cgroup/blkio) nor io controller (v2) to \
                 throttle reads with"
            );
        };
        if dir.exists() {
            let _ = std::fs::remove_dir(&dir);
        }
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let group = Self { dir };
        std::fs::write(group.dir.join(file), &line)
            .with_context(|| format!("writing {line:?} to {}/{file}", group.dir.display()))?;
        Ok(group)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// `sh -c 'echo $$ > GROUP/cgroup.procs && exec "$@"' sh ARGV...`: the job starts inside the
    /// group (and so do all its children).
    pub(crate) fn wrap(&self, argv: Vec<OsString>) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![
            "/bin/sh".into(),
            "-c".into(),
            format!(
                "echo $$ > '{}/cgroup.procs' && exec \"$@\"",
                self.dir.display()
            )
            .into(),
            "sh".into(),
        ];
        v.extend(argv);
        v
    }
}

impl Drop for ThrottleGroup {
    fn drop(&mut self) {
        // The group empties when the job's last process is reaped.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "xtask: could not remove {} (processes left in it?)",
            self.dir.display()
        );
    }
}

/// The release binary built by `cargo xtask demo`/`build`.
pub(crate) fn release_bin() -> Result<PathBuf> {
    let bin = target_dir().join("release/stallmon");
    if !bin.exists() {
        bail!(
            "{} is missing: build it with `cargo xtask build`",
            bin.display()
        );
    }
    Ok(bin)
}

pub(crate) fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

pub fn demo(seconds: u32) -> Result<()> {
    require_root("cargo xtask demo")?;
    let bin = release_bin()?;
    let py = python()?;
    let target = target_dir();
    let record = target.join("demo-record.jsonl");
    let secs = seconds.max(1).to_string();

    // Real GPU only with both NVML (nvidia-smi) and PyTorch on CUDA; else the simulated GPU.
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

    let (data, job, simulate) = if torch {
        let data = target.join("demo-data-torch");
        crate::run(
            Command::new(&py)
                .arg(workload("torch_train.py"))
                .args(["--prepare", "--uncached", "--data"])
                .arg(&data),
        )?;
        let mut job = vec![
            py.clone().into_os_string(),
            workload("torch_train.py").into(),
        ];
        job.extend(os(&["--data"]));
        job.push(data.clone().into());
        job.extend(os(&["--workers", "4", "--uncached", "--seconds", &secs]));
        (data, job, None)
    } else {
        let data = target.join("demo-data");
        crate::run(
            Command::new(&py)
                .arg(workload("trainloop.py"))
                .args(["--prepare", "--uncached", "--data"])
                .arg(&data),
        )?;
        let steps = target.join("demo-gpu-steps.txt");
        let _ = std::fs::remove_file(&steps);
        let mut job = vec![py.clone().into_os_string(), workload("trainloop.py").into()];
        job.extend(os(&["--data"]));
        job.push(data.clone().into());
        job.extend(os(&[
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
            "--gpu-file",
        ]));
        job.push(steps.clone().into());
        (data, job, Some(steps))
    };

    let group = ThrottleGroup::create(DEMO_GROUP, &data, DEMO_BPS)?;
    let (major, minor) = disk_of(&data)?;
    eprintln!(
        "xtask: reads from disk {major}:{minor} (holding {}) throttled to {} MiB/s for the job \
         ({})",
        data.display(),
        DEMO_BPS >> 20,
        group.dir().display()
    );
    if simulate.is_some() {
        let why = if nvidia_gpus().is_ok() {
            "PyTorch with CUDA not usable on this machine"
        } else {
            "no NVIDIA GPU on this machine"
        };
        let banner = format!("SIMULATED GPU ({why})");
        let rule = "=".repeat(banner.len() + 8);
        eprintln!("\n{rule}\n    {banner}\n{rule}");
        eprintln!(
            "The GPU below is stallmon's simulated GPU, busy exactly during the job's \"GPU \
             steps\"; the job's I/O, worker processes and thread states are real.\n"
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
    if let Some(steps) = &simulate {
        cmd.arg("--simulate-gpu").arg(steps);
    }
    cmd.arg("--").args(group.wrap(job));
    eprintln!("xtask: running {cmd:?}\n");
    let status = cmd
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    drop(group);
    if !status.success() {
        bail!("stallmon trace failed: {status}");
    }
    eprintln!(
        "\nxtask: the record file is {rec}\n\
         xtask: recompute the attribution offline with:\n    {bin} report {rec}\n\
         xtask: (add --json for machine-readable output)",
        rec = record.display(),
        bin = bin.display()
    );
    Ok(())
}
