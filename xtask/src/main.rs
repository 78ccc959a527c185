//! `cargo xtask`: set-up, build, lint, test, demo and benchmarks, so that a fresh machine needs
//! nothing by hand beyond `rustup toolchain install` (which `rust-toolchain.toml` pins).
mod bench;
mod demo;
mod gpu_e2e;
mod setup;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: bpf-linker 0.10.3, Debian packages (fio, bpftrace, prometheus,
    /// bpftool), tracefs mount.
    Setup,
    /// Build stallmon (release): target/release/stallmon.
    Build,
    /// rustfmt check and clippy (-D warnings) on user space and the eBPF crate.
    Lint,
    /// Set up, lint, build, then run every test (unit and privileged integration tests).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the tracer on the bundled DataLoader-style job over throttled storage and print the
    /// summary (NVML when a GPU is present, else a simulated GPU, labelled as such).
    Demo {
        /// Seconds the demo job trains.
        #[arg(long, default_value = "20")]
        seconds: u32,
    },
    /// Overhead benchmark (see docs/benchmarks.md).
    Bench {
        /// Short run (< 3 minutes), as CI's smoke test.
        #[arg(long)]
        quick: bool,
    },
    /// Real PyTorch training on CUDA, throttled storage vs page cache, and two torchrun ranks
    /// sharing the GPU, traced with real NVML (GPU hosts only; never in CI).
    GpuE2e {
        /// stallmon binary to use (default target/release/stallmon).
        #[arg(long)]
        bin: Option<std::path::PathBuf>,
    },
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(tests::repo_root());
    c
}

/// The cargo target directory (`$CARGO_TARGET_DIR`, else `target/` in the repository).
pub fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tests::repo_root().join("target"))
}

fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "monitor-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;

    // The kernel crate, for its real target.
    run(cargo().env("RUSTC_BOOTSTRAP", "1").args([
        "clippy",
        "-p",
        "monitor-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Build => {
            setup::setup()?;
            run(cargo().args(["build", "--release", "-p", "monitor-userspace"]))
        }
        Cmd::Lint => {
            setup::setup()?;
            lint()
        }
        Cmd::Test { args } => {
            setup::setup()?;
            lint()?;
            // The binary under test and the stand-in NVML library the GPU tests load.
            run(cargo().args(["build", "-p", "monitor-userspace", "-p", "nvml-standin"]))?;
            // Privileged tests share the machine's disk, cgroups and ports: one at a time.
            run(cargo()
                .args(["test", "--workspace", "--exclude", "monitor-ebpf"])
                .args(&args)
                .args(["--", "--test-threads=1"]))
        }
        Cmd::Demo { seconds } => {
            setup::setup()?;
            run(cargo().args(["build", "--release", "-p", "monitor-userspace"]))?;
            demo::demo(seconds)
        }
        Cmd::Bench { quick } => {
            setup::setup()?;
            run(cargo().args(["build", "--release", "-p", "monitor-userspace"]))?;
            bench::bench(quick)
        }
        Cmd::GpuE2e { bin } => gpu_e2e::gpu_e2e(bin),
    }
}
