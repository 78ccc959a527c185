//! Shared harness of stallmon's privileged integration tests.
//!
//! These tests load eBPF programs, create cgroups and read `/sys/block`: they need root on a
//! kernel with BTF. They never skip: on a machine that cannot run them, [`require_privileged`]
//! fails the test with the reason (and `cargo xtask test` sets everything up first).
pub mod prom;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The stallmon binary under test: `$STALLMON_BIN`, else `target/debug/stallmon` (built by
/// `cargo xtask test`).
pub fn stallmon_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("STALLMON_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let p = target.join("debug/stallmon");
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo xtask test` does), or set STALLMON_BIN",
        p.display()
    );
    p
}

/// A bundled workload script.
pub fn workload(name: &str) -> PathBuf {
    repo_root().join("tests/workloads").join(name)
}

/// The real Python interpreter (not a pyenv shim, which would fork helpers of its own and
/// become part of the traced job).
pub fn python() -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 is required by the workloads");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Creates (or reuses) the dataset of `tests/workloads/loader.py`: `files` files of `kib` KiB of
/// random bytes under `data`.
pub fn loader_dataset(data: &Path, files: u32, kib: u32) {
    let status = Command::new(python())
        .arg(workload("loader.py"))
        .args(["--create", "--report", "/dev/null"])
        .args(["--files", &files.to_string(), "--kib", &kib.to_string()])
        .arg("--data")
        .arg(data)
        .status()
        .expect("running loader.py --create");
    assert!(
        status.success(),
        "creating the dataset under {}",
        data.display()
    );
}

/// Fails the test (never skips) unless this machine can run privileged tracing tests.
pub fn require_privileged() {
    // SAFETY: trivial libc call.
    let euid = unsafe { libc::geteuid() };
    let mut problems = Vec::new();
    if euid != 0 {
        problems.push("not running as root".to_string());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        problems.push("no kernel BTF at /sys/kernel/btf/vmlinux".to_string());
    }
    if !Path::new("/sys/kernel/tracing/events").is_dir() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status();
        if !Path::new("/sys/kernel/tracing/events").is_dir() {
            problems.push("tracefs not mounted at /sys/kernel/tracing".to_string());
        }
    }
    assert!(
        problems.is_empty(),
        "privileged test cannot run here ({}); this is a failure, not a skip: run `cargo xtask test` as root",
        problems.join(", ")
    );
}

/// A running `stallmon trace`, with its metrics address parsed from stderr.
pub struct Tracer {
    pub child: Child,
    pub addr: SocketAddr,
    stderr_rx: mpsc::Receiver<String>,
    pub stderr: Vec<String>,
}

impl Tracer {
    /// Starts `stallmon trace --listen 127.0.0.1:0 ARGS...` and waits until it is tracing.
    pub fn start(args: &[&str]) -> Result<Self> {
        let mut child = Command::new(stallmon_bin())
            .arg("trace")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting stallmon")?;
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let addr = line
                        .split("metrics on http://")
                        .nth(1)
                        .and_then(|rest| rest.strip_suffix("/metrics"))
                        .and_then(|a| a.parse().ok());
                    lines.push(line);
                    if let Some(addr) = addr {
                        return Ok(Self {
                            child,
                            addr,
                            stderr_rx: rx,
                            stderr: lines,
                        });
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait()?;
                    bail!("stallmon did not start ({status}): {}", lines.join("\n"));
                }
            }
        }
    }

    pub fn scrape(&self) -> Result<String> {
        let (code, body) = prom::http_get(self.addr, "/metrics")?;
        if code != 200 {
            bail!("GET /metrics answered {code}");
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Sends SIGINT (like Ctrl-C) and waits for the summary.
    pub fn stop(self) -> Result<Finished> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.wait()
    }

    /// Waits for stallmon to exit by itself (target exited or --duration).
    pub fn wait(mut self) -> Result<Finished> {
        let mut stdout = String::new();
        use std::io::Read;
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)?;
        let status = self.child.wait()?;
        while let Ok(line) = self.stderr_rx.recv_timeout(Duration::from_secs(2)) {
            self.stderr.push(line);
        }
        Ok(Finished {
            status,
            stdout,
            stderr: self.stderr.join("\n"),
        })
    }
}

pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// The `--json` summary.
    pub fn summary(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| {
            format!(
                "stdout is not a JSON summary: {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Value of one sample in a Prometheus text exposition (`name{labels}` written exactly as
/// `selector`, or a plain name).
pub fn metric_value(text: &str, selector: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == selector).then(|| value.parse().ok())?
    })
}

/// Sum of every sample of `name` whose labels contain all `labels` (`k="v"` strings).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|lab| rest.contains(lab)))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// A cgroup-v1 blkio group that throttles reads from the root disk: a genuinely slow disk for
/// one process tree. Removed on drop.
pub struct SlowDisk {
    pub dir: PathBuf,
}

/// `major:minor` of the block device holding `path`'s filesystem (the whole disk).
pub fn disk_of(path: &Path) -> Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path)?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    // A partition's "partition" attribute exists; its parent directory is the disk.
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let real = std::fs::canonicalize(&sys)?;
    let disk_dir = if real.join("partition").exists() {
        real.parent().unwrap().to_path_buf()
    } else {
        real
    };
    let devno = std::fs::read_to_string(disk_dir.join("dev"))?;
    let (a, b) = devno
        .trim()
        .split_once(':')
        .ok_or_else(|| anyhow!("bad dev file"))?;
    Ok((a.parse()?, b.parse()?))
}

/// Name of the whole disk holding `path` (e.g. "vda").
pub fn disk_name_of(path: &Path) -> Result<String> {
    let (major, minor) = disk_of(path)?;
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))?;
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no DEVNAME"))
}

impl SlowDisk {
    /// Reads from the disk holding `path` limited to `bytes_per_sec` for processes in the group.
    pub fn new(name: &str, path: &Path, bytes_per_sec: u64) -> Result<Self> {
        let dir = PathBuf::from("/sys/fs/cgroup/blkio").join(name);
        if dir.exists() {
            let _ = std::fs::remove_dir(&dir);
        }
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (major, minor) = disk_of(path)?;
        std::fs::write(
            dir.join("blkio.throttle.read_bps_device"),
            format!("{major}:{minor} {bytes_per_sec}"),
        )?;
        Ok(Self { dir })
    }

    /// Shell prefix that moves the shell into this group before exec'ing the command.
    pub fn wrap(&self, argv: &[String]) -> Vec<String> {
        let mut v = vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            format!(
                "echo $$ > {}/cgroup.procs && exec \"$@\"",
                self.dir.display()
            ),
            "sh".to_string(),
        ];
        v.extend(argv.iter().cloned());
        v
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Drops the page cache so that the next buffered reads hit the disk.
pub fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// A scratch directory under the repository's target dir (on the traced disk, unlike tmpfs).
pub fn scratch_dir(name: &str) -> PathBuf {
    let d = repo_root().join("target/test-data").join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}
