//! Installs what a fresh machine lacks. Idempotent: each step checks first.
use std::{path::Path, process::Command};

use anyhow::{Result, bail};

use crate::run;

const BPF_LINKER_VERSION: &str = "0.10.3";
/// Debian packages the tests, demo and benchmark use.
const PACKAGES: &[(&str, &str)] = &[
    ("fio", "fio"),
    ("bpftrace", "bpftrace"),
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    ("bpftool", "bpftool"),
    ("python3", "python3"),
];

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

pub fn setup() -> Result<()> {
    // bpf-linker 0.10.3 matches the pinned toolchain's LLVM 22 (newer ones need a system LLVM 23).
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if !linker_ok {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION}");
        run(crate::cargo().args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ]))?;
    }
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask: installing Debian packages {missing:?}");
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing))?;
    }
    if !Path::new("/sys/kernel/tracing/events").is_dir() {
        eprintln!("xtask: mounting tracefs");
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status();
        if !Path::new("/sys/kernel/tracing/events").is_dir() {
            bail!("tracefs is not mounted and could not be mounted (are you root?)");
        }
    }
    Ok(())
}
