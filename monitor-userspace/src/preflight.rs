//! `stallmon check` and the checks `stallmon trace` makes before loading anything: privileges,
//! kernel BTF, tracefs, every attach point, and the NVIDIA management library.
use std::path::Path;

use anyhow::{Result, bail};

use crate::kernel::{LoadOptions, PROGRAMS, Program, offsets};

pub const TRACEFS: &str = "/sys/kernel/tracing";

/// tracefs mount point: `$STALLMON_TRACEFS` (for tests of the error path), else [`TRACEFS`].
fn tracefs_path() -> std::path::PathBuf {
    std::env::var_os("STALLMON_TRACEFS")
        .map(Into::into)
        .unwrap_or_else(|| TRACEFS.into())
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Root, or CAP_BPF with CAP_PERFMON (or the older catch-all CAP_SYS_ADMIN).
pub fn privileges() -> Result<String> {
    let caps = effective_caps();
    let has = |c: u32| caps & (1 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        // SAFETY: trivial libc call.
        let euid = unsafe { libc::geteuid() };
        Ok(if euid == 0 {
            "running as root".into()
        } else {
            "CAP_BPF and CAP_PERFMON are effective".into()
        })
    } else {
        bail!("stallmon needs root or CAP_BPF+CAP_PERFMON to load eBPF programs; run it with sudo")
    }
}

pub fn btf() -> Result<String> {
    let path = offsets::btf_path();
    if !path.exists() {
        bail!(
            "kernel BTF not found at {}: stallmon needs a kernel built with CONFIG_DEBUG_INFO_BTF=y",
            path.display()
        );
    }
    offsets::resolve_running_kernel()?;
    Ok(format!(
        "{} present, struct offsets resolved",
        path.display()
    ))
}

/// tracefs must be mounted for classic tracepoints; mount it if we may.
pub fn tracefs(mount_if_missing: bool) -> Result<String> {
    let root = tracefs_path();
    let shown = root.display();
    let events = root.join("events");
    if events.is_dir() {
        return Ok(format!("tracefs mounted at {shown}"));
    }
    if mount_if_missing && root.is_dir() {
        let status = std::process::Command::new("mount")
            .args(["-t", "tracefs", "nodev"])
            .arg(&root)
            .stderr(std::process::Stdio::null())
            .status();
        if status.is_ok_and(|s| s.success()) && events.is_dir() {
            return Ok(format!("tracefs was not mounted; mounted it at {shown}"));
        }
    }
    bail!("tracefs is not mounted at {shown}: run `mount -t tracefs nodev {shown}` as root")
}

/// Whether the running kernel offers a program's BTF tracepoint.
pub fn attach_point(p: &Program) -> Result<String> {
    let btf = offsets::open_btf()?;
    if btf
        .resolve_ids_by_name(&format!("btf_trace_{}", p.tracepoint))
        .is_ok()
    {
        Ok(format!(
            "BTF tracepoint tp_btf/{}{}",
            p.tracepoint,
            if p.syscalls_only { " (--syscalls)" } else { "" }
        ))
    } else {
        bail!("BTF tracepoint {} not in this kernel's BTF", p.tracepoint)
    }
}

/// One line of `stallmon check`.
pub struct CheckItem {
    pub name: String,
    pub result: Result<String>,
    /// Failing this item stops tracing (false: only GPU attribution is affected).
    pub required: bool,
}

/// Runs every check; `load` also loads and attaches the programs once (the verifier's verdict).
pub fn run_all(load: bool, nvml_lib: Option<&Path>) -> Vec<CheckItem> {
    let mut items = vec![
        CheckItem {
            name: "privileges".into(),
            result: privileges(),
            required: true,
        },
        CheckItem {
            name: "kernel BTF".into(),
            result: btf(),
            required: true,
        },
        CheckItem {
            name: "tracefs".into(),
            result: tracefs(true),
            required: true,
        },
    ];
    for p in PROGRAMS {
        items.push(CheckItem {
            name: format!("attach point for {}", p.name),
            result: attach_point(p),
            required: !p.syscalls_only,
        });
    }
    if load && items.iter().all(|i| i.result.is_ok()) {
        items.push(CheckItem {
            name: "load and attach".into(),
            result: crate::kernel::Kernel::load(LoadOptions {
                syscalls: true,
                slots: 1,
                probe_issue_time: false,
            })
            .map(|_| {
                format!(
                    "{} programs loaded and attached (with --syscalls), then detached",
                    PROGRAMS.len()
                )
            })
            .map_err(Into::into),
            required: true,
        });
    }
    items.push(CheckItem {
        name: "NVML".into(),
        result: nvml(nvml_lib),
        required: false,
    });
    items
}

/// Whether NVML can be initialised (the driver's libnvidia-ml.so and a GPU).
pub fn nvml(lib: Option<&Path>) -> Result<String> {
    let opts = crate::gpu::GpuOptions {
        lib_path: lib.map(Path::to_path_buf),
        select: None,
    };
    match crate::gpu::NvmlSampler::new(&opts) {
        Ok(s) => Ok(format!(
            "NVML initialised, {} GPU(s){}",
            s.indices().len(),
            if s.source() == "simulated" {
                " (the stand-in library: simulated)"
            } else {
                ""
            }
        )),
        Err(e) => bail!("{e}: GPU attribution disabled, I/O tracing works"),
    }
}

/// Prints the check list; returns the exit code.
pub fn report(items: &[CheckItem]) -> i32 {
    let mut failed = false;
    for i in items {
        match &i.result {
            Ok(msg) => crate::console::out(&format!("PASS  {:<34} {msg}\n", i.name)),
            Err(e) if i.required => {
                failed = true;
                crate::console::out(&format!("FAIL  {:<34} {e:#}\n", i.name));
            }
            Err(e) => crate::console::out(&format!("WARN  {:<34} {e:#}\n", i.name)),
        }
    }
    if failed {
        crate::console::out("stallmon cannot trace on this machine: fix the FAIL lines above\n");
        1
    } else {
        crate::console::out("stallmon can trace on this machine\n");
        0
    }
}
