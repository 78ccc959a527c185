//! `stallmon`: why are our GPUs idle?
use std::{ffi::OsString, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use monitor_userspace::{job, preflight, trace};

/// Default listen address of the metrics endpoint (loopback only; see docs/operator-guide.md).
const DEFAULT_LISTEN: &str = "127.0.0.1:9435";

#[derive(Parser)]
#[command(
    name = "stallmon",
    version,
    about = "Why are our GPUs idle? Traces a training job's storage I/O, reads and thread states with eBPF, samples GPUs with NVML, and attributes GPU idle time to its cause."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Trace a running process (--pid) or a command (after --), serve /metrics, print a summary.
    Trace(TraceCli),
    /// Preflight: privileges, BTF, tracefs, every tracepoint, a test load, NVML.
    Check {
        /// Skip the test load of the programs.
        #[arg(long)]
        no_load: bool,
    },
    /// Recompute the GPU attribution of a record file offline and print the summary.
    Report {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct TraceCli {
    /// PID of the training process to attach to (its existing and future descendants are
    /// followed too).
    #[arg(long, conflicts_with = "command", required_unless_present = "command")]
    pid: Option<u32>,
    /// Address of the Prometheus endpoint.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Seconds between snapshots (metrics refresh and record-file lines).
    #[arg(long, default_value = "1", value_parser = parse_seconds)]
    interval: Duration,
    /// Stop after this many seconds (default: until the target exits or SIGINT/SIGTERM).
    #[arg(long, value_parser = parse_seconds)]
    duration: Option<Duration>,
    /// Write JSON lines (per interval, per process deltas, attribution inputs) to this file.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Print the exit summary as JSON on stdout instead of the table on stderr.
    #[arg(long)]
    json: bool,
    /// Thread that launches GPU work (default: the target's main thread).
    #[arg(long)]
    feeder_tid: Option<u32>,
    /// Job name label (default: SLURM_JOB_ID, TORCHELASTIC_RUN_ID or the Kubernetes pod of the
    /// target, else its command name).
    #[arg(long)]
    job_name: Option<String>,
    /// GPUs to attribute (indexes, comma separated; default: GPUs where the job holds a context).
    #[arg(long, value_delimiter = ',')]
    gpus: Option<Vec<u32>>,
    /// Do not sample GPUs.
    #[arg(long)]
    no_gpu: bool,
    /// DEMO/TEST ONLY: instead of NVML, a simulated GPU whose busy intervals the job appends to
    /// this file ("start_ns end_ns" per line, CLOCK_MONOTONIC). Every output says "simulated".
    #[arg(long, value_name = "FILE")]
    simulate_gpu: Option<PathBuf>,
    /// The command to start and trace (after --); stallmon exits with its status.
    #[arg(last = true)]
    command: Vec<OsString>,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("not a number of seconds: {s}"))?;
    if !(v > 0.0 && v.is_finite()) {
        return Err(format!("must be a positive number of seconds: {s}"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn main() -> ExitCode {
    // The trampoline used by `trace -- COMMAND` (see job::spawn_gated): never returns on success.
    let raw: Vec<OsString> = std::env::args_os().collect();
    if raw.get(1).is_some_and(|a| a == job::GATE_SUBCOMMAND) {
        let e = job::exec_after_gate(&raw[2..]);
        eprintln!("stallmon: error: {e:#}");
        return ExitCode::from(127);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Check { no_load } => Ok(preflight::report(&preflight::run_all(!no_load))),
        Cmd::Report { file, json } => monitor_userspace::report_cmd::run(&file, json),
        Cmd::Trace(t) => {
            let args = trace::TraceArgs {
                pid: t.pid,
                command: t.command,
                listen: t.listen,
                interval: t.interval,
                duration: t.duration,
                record: t.record,
                json: t.json,
                feeder_tid: t.feeder_tid,
                job_name: t.job_name,
                gpus: t.gpus,
                no_gpu: t.no_gpu,
                simulate_gpu: t.simulate_gpu,
            };
            trace::run(args)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("stallmon: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
