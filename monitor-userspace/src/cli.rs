//! The command line: flags as the user types them (every flag also from a `STALLMON_*`
//! environment variable), turned once into the typed settings the stages are built from, the way
//! ripgrep turns its low-level arguments into high-level ones. Nothing downstream sees a flag.
use std::{ffi::OsString, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use regex::Regex;

use crate::gpu::{GpuOptions, GpuSelector};

/// Default listen address of the metrics endpoint: loopback only (see docs/operator-guide.md),
/// on a port no exporter in Prometheus' default port allocations uses.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:19435";

#[derive(Parser)]
#[command(
    name = "stallmon",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("STALLMON_REVISION"), ")"),
    about = "Why are our GPUs idle? Traces training jobs' storage I/O and thread states with eBPF, samples GPUs with NVML, and attributes GPU idle time to its cause."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
    /// Log format on stderr: text (with timestamps) or json (one object per line).
    #[arg(
        long,
        global = true,
        env = "STALLMON_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log level: error, warn, info, debug, trace (or a tracing filter such as
    /// `stallmon=debug`).
    #[arg(
        long,
        global = true,
        env = "STALLMON_LOG_LEVEL",
        default_value = "info"
    )]
    pub log_level: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where a block request's issue time comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BlockIssueTime {
    /// The block layer's own timestamp where it keeps one (the common case: devices with
    /// writeback throttling or other block statistics), a probe at issue elsewhere.
    Auto,
    /// A probe at issue for every request (costs more per I/O; for comparison and for
    /// kernels whose plug-cached timestamps hide queueing).
    Probe,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Trace one job: a running process (--pid) or a command (after --). Serves /metrics, prints
    /// a summary at the end.
    Trace(TraceArgs),
    /// Trace every job on this host: processes holding a GPU context (NVML), or matching
    /// --match. For a systemd unit or a Kubernetes DaemonSet.
    Node(NodeArgs),
    /// Preflight: privileges, BTF, tracefs, every attach point, a test load, NVML.
    Check {
        /// Skip the test load of the programs.
        #[arg(long)]
        no_load: bool,
        /// NVML library to check (default: the driver's).
        #[arg(long, env = "STALLMON_NVML_LIB")]
        nvml_lib: Option<PathBuf>,
    },
    /// Rebuild the summary of a record file (`-` for standard input).
    Report {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Parses a duration: `30s`, `5m`, `1h30m`, `250ms`, or plain seconds (`1`, `0.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e9 => Duration::from_secs_f64(v),
        Ok(_) => {
            return Err(format!(
                "must be a positive number of seconds (up to 1e9): {s}"
            ));
        }
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("not a duration ({e}): {s:?}; write e.g. 30s, 5m, 1h"))?,
    };
    if d.is_zero() {
        return Err(format!("must be longer than zero: {s}"));
    }
    Ok(d)
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(10) || d > Duration::from_secs(3600) {
        return Err(format!("must be between 10ms and 1h: {s}"));
    }
    Ok(d)
}

fn parse_regex(s: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(s)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| e.to_string())
}

/// Flags of both tracing commands.
#[derive(Args)]
pub struct CommonArgs {
    /// Address of the Prometheus endpoint. Loopback by default: expose it only behind the
    /// node's proxy (see the operator guide).
    #[arg(long, env = "STALLMON_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Time between snapshots (metrics refresh, record lines): e.g. 1s, 500ms, 1m.
    #[arg(long, env = "STALLMON_INTERVAL", default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Stop after this long (e.g. 10m; default: until the target exits, or SIGINT/SIGTERM).
    #[arg(long, env = "STALLMON_DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Write the record (JSON lines: intervals, attribution inputs, the summary) to this new
    /// file, mode 0600. An existing file is refused unless --record-append.
    #[arg(long, env = "STALLMON_RECORD")]
    pub record: Option<PathBuf>,
    /// Append to an existing record file (a regular file owned by stallmon's user).
    #[arg(long, env = "STALLMON_RECORD_APPEND", requires = "record")]
    pub record_append: bool,
    /// Print the exit summary as JSON on stdout instead of the table on stderr.
    #[arg(long, env = "STALLMON_JSON")]
    pub json: bool,
    /// Once tracing, write a JSON document here (stallmon's PID, the listen address): a
    /// machine-readable ready signal for scripts.
    #[arg(long, env = "STALLMON_READY_FILE")]
    pub ready_file: Option<PathBuf>,
    /// Also trace every read-family syscall for exact per-call latency and bytes by fd kind.
    /// COST: attaches syscall tracepoints, which slow every syscall of every process on the
    /// machine (+16% on a syscall-bound loop that is not even traced, +64% on a traced one; see
    /// docs/benchmarks.md). The default mode measures read stalls at the context switch instead.
    #[arg(long, env = "STALLMON_SYSCALLS")]
    pub syscalls: bool,
    /// Where block requests' issue times come from (docs/metrics.md, "Block I/O").
    #[arg(
        long,
        env = "STALLMON_BLOCK_ISSUE_TIME",
        value_enum,
        default_value = "auto"
    )]
    pub block_issue_time: BlockIssueTime,
    /// GPUs to attribute: NVML indexes or UUIDs, comma separated (default: the GPUs where the
    /// job holds a context).
    #[arg(long, env = "STALLMON_GPUS", value_delimiter = ',')]
    pub gpus: Option<Vec<GpuSelector>>,
    /// Do not sample GPUs.
    #[arg(long, env = "STALLMON_NO_GPU")]
    pub no_gpu: bool,
    /// The NVML library to load (default: the driver's libnvidia-ml.so.1). The tests' stand-in
    /// library is labelled simulated everywhere.
    #[arg(long, env = "STALLMON_NVML_LIB")]
    pub nvml_lib: Option<PathBuf>,
    /// Rank slots in the kernel tables (ranks traced at once; past it, ranks are followed but
    /// not accounted). Each slot costs about 1 KiB per CPU of kernel memory.
    #[arg(long, env = "STALLMON_MAX_RANKS", default_value = "32", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_ranks: u32,
}

#[derive(Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// PID of the job to attach to (its existing and future descendants are followed too). A
    /// thread id is resolved to its process.
    #[arg(
        long,
        env = "STALLMON_PID",
        conflicts_with = "command",
        required_unless_present = "command"
    )]
    pub pid: Option<u32>,
    /// Thread that launches GPU work (default: found: see docs/method.md "Roles").
    #[arg(long, env = "STALLMON_FEEDER_TID")]
    pub feeder_tid: Option<u32>,
    /// Job name label (default: TORCHELASTIC_RUN_ID, else the command name).
    #[arg(long, env = "STALLMON_JOB_NAME")]
    pub job_name: Option<String>,
    /// The command to start and trace (after --); stallmon exits with its status.
    #[arg(last = true)]
    pub command: Vec<OsString>,
}

#[derive(Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Also follow processes whose command line matches this regular expression (hosts without
    /// NVML, or jobs before they touch a GPU). Repeatable.
    #[arg(long = "match", env = "STALLMON_MATCH", value_parser = parse_regex, value_delimiter = '\n')]
    pub matchers: Vec<Regex>,
    /// How long an ended job's final series stay exported.
    #[arg(long, env = "STALLMON_FORGET_AFTER", default_value = "5m", value_parser = parse_duration)]
    pub forget_after: Duration,
    /// The kubelet pod-resources socket (pod names of GPUs, as dcgm-exporter gets them).
    #[arg(long, env = "STALLMON_POD_RESOURCES_SOCKET", default_value = crate::podresources::DEFAULT_SOCKET)]
    pub pod_resources_socket: PathBuf,
}

/// The GPU side, decided once.
pub enum GpuChoice {
    Off(String),
    Nvml(GpuOptions),
}

impl CommonArgs {
    pub fn gpu(&self) -> GpuChoice {
        if self.no_gpu {
            GpuChoice::Off("GPU attribution disabled: --no-gpu".into())
        } else {
            GpuChoice::Nvml(GpuOptions {
                lib_path: self.nvml_lib.clone(),
                select: self.gpus.clone(),
            })
        }
    }

    /// Warnings about settings that are legal but probably not what the user wants.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.listen.ip().is_loopback() {
            w.push(format!(
                "--listen {}: the endpoint is reachable from other hosts, without TLS or authentication; the operator guide says to expose it only behind the node's proxy",
                self.listen
            ));
        }
        if self.interval > Duration::from_secs(60) {
            w.push(format!(
                "--interval {}: figures are refreshed (and record lines written) only that often",
                humantime::format_duration(self.interval)
            ));
        }
        if let Some(d) = self.duration
            && d < self.interval
        {
            w.push(format!(
                "--duration {} is shorter than --interval {}: only the final figures will be taken",
                humantime::format_duration(d),
                humantime::format_duration(self.interval)
            ));
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        for bad in [
            "1e300",
            "1e20",
            "-1",
            "0",
            "nan",
            "inf",
            "",
            "5 parsecs",
            "0s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_interval("1h").is_ok());
        assert!(parse_interval("2h").is_err());
        assert!(parse_interval("1ms").is_err());
    }

    #[test]
    fn flags_from_the_environment_and_warnings() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "stallmon",
            "node",
            "--listen",
            "0.0.0.0:19435",
            "--interval",
            "2m",
        ])
        .unwrap();
        let Cmd::Node(n) = cli.command else { panic!() };
        let w = n.common.warnings();
        assert!(
            w.iter().any(|w| w.contains("reachable from other hosts")),
            "{w:?}"
        );
        assert!(w.iter().any(|w| w.contains("--interval 2m")), "{w:?}");
        assert!(
            Cli::try_parse_from(["stallmon", "trace", "--interval", "1e300", "--", "true"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["stallmon", "node", "--match", "("]).is_err());
        let cli = Cli::try_parse_from(["stallmon", "trace", "--gpus", "0,GPU-abc", "--", "true"])
            .unwrap();
        let Cmd::Trace(t) = cli.command else { panic!() };
        assert_eq!(
            t.common.gpus,
            Some(vec![
                GpuSelector::Index(0),
                GpuSelector::Uuid("GPU-abc".into())
            ])
        );
    }
}
