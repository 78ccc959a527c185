//! A real Prometheus server for tests, and the catalogue of stallmon's metrics.
//!
//! [`Prometheus::start`] runs the `prometheus` binary (Debian package
//! `prometheus`; another binary can be named with `$STALLMON_PROMETHEUS`) on a
//! free loopback port, with a temporary configuration that scrapes the given
//! targets every second and a temporary TSDB directory. It waits until the
//! server is ready, answers PromQL queries through the HTTP API and kills the
//! server and removes its files on drop.
//!
//! ```no_run
//! let prom = tests::prom::Prometheus::start("127.0.0.1:19435")?;
//! prom.wait_for_series("stallmon_target_up", std::time::Duration::from_secs(30))?;
//! let result = prom.query("sum by (cause) (stallmon_gpu_idle_seconds_total)")?;
//! # anyhow::Ok(())
//! ```
//!
//! HTTP is spoken with a minimal HTTP/1.0 client over `std::net::TcpStream`:
//! Prometheus answers HTTP/1.0 requests with a plain body and closes the
//! connection, so no chunked decoding is needed.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Every metric stallmon exports (names as exposed; histograms also expose
/// `_bucket`, `_sum` and `_count` series, see [`HISTOGRAMS`]).
pub const STALLMON_METRICS: &[&str] = &[
    "stallmon_build_info",
    // storage, the whole machine
    "stallmon_block_io_latency_seconds",
    "stallmon_block_io_queue_seconds",
    "stallmon_block_io_bytes_total",
    "stallmon_block_io_requests_total",
    "stallmon_block_io_job_bytes_total",
    // jobs
    "stallmon_target_up",
    "stallmon_tracked_processes",
    "stallmon_task_state_seconds_total",
    "stallmon_read_stall_seconds",
    "stallmon_read_latency_seconds",
    "stallmon_read_bytes_total",
    "stallmon_task_read_syscalls_total",
    "stallmon_task_read_bytes_total",
    "stallmon_task_storage_read_bytes_total",
    "stallmon_job_block_io_requests_total",
    "stallmon_job_block_io_bytes_total",
    // stallmon itself
    "stallmon_dropped_events_total",
    "stallmon_record_errors_total",
    "stallmon_rank_slots",
    "stallmon_kernel_processes",
    "stallmon_block_issue_probe_attached",
    "stallmon_jobs",
    // GPU
    "stallmon_gpu_info",
    "stallmon_gpu_utilization_ratio",
    "stallmon_gpu_busy_seconds_total",
    "stallmon_gpu_idle_seconds_total",
    "stallmon_gpu_memory_used_bytes",
    "stallmon_gpu_memory_total_bytes",
    "stallmon_gpu_temperature_celsius",
    "stallmon_gpu_power_watts",
    "stallmon_gpu_pcie_bytes_total",
    "stallmon_gpu_throttle_reasons",
    "stallmon_gpu_stale",
    "stallmon_gpu_simulated",
];

/// The histograms among [`STALLMON_METRICS`].
pub const HISTOGRAMS: &[&str] = &[
    "stallmon_block_io_latency_seconds",
    "stallmon_block_io_queue_seconds",
    "stallmon_read_stall_seconds",
    "stallmon_read_latency_seconds",
];

/// The `stallmon_*` families of an exposition that [`STALLMON_METRICS`] does not know (it must
/// stay the complete list: the rules, dashboard and Zabbix checks rely on it).
pub fn unknown_families(exposition: &str) -> Vec<String> {
    let mut out: Vec<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("stallmon_") && !STALLMON_METRICS.contains(n))
        .map(str::to_string)
        .collect();
    out.dedup();
    out
}

/// Whether `name` is a series name stallmon exposes: one of
/// [`STALLMON_METRICS`], or a histogram's `_bucket`, `_sum` or `_count`.
pub fn is_stallmon_series(name: &str) -> bool {
    if STALLMON_METRICS.contains(&name) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .is_some_and(|base| HISTOGRAMS.contains(&base))
    })
}

/// The `prometheus` binary: `$STALLMON_PROMETHEUS`, else `prometheus` on PATH.
pub fn prometheus_binary() -> Result<PathBuf> {
    find_binary("STALLMON_PROMETHEUS", "prometheus")
}

/// The `promtool` binary: `$STALLMON_PROMTOOL`, else `promtool` on PATH.
pub fn promtool_binary() -> Result<PathBuf> {
    find_binary("STALLMON_PROMTOOL", "promtool")
}

fn find_binary(env: &str, name: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("${env} names {}, which is not a file", path.display());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            anyhow!(
                "`{name}` not found on PATH: install it (Debian: apt-get install prometheus) \
                 or set ${env}"
            )
        })
}

/// Runs `promtool` with `args` in `dir`; Ok(combined output) when it exits 0,
/// Err with the output otherwise (or when promtool is missing).
pub fn promtool(dir: &Path, args: &[&str]) -> Result<String> {
    let bin = promtool_binary()?;
    let out: Output = Command::new(&bin)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "promtool {} failed ({}):\n{text}",
            args.join(" "),
            out.status
        );
    }
    Ok(text)
}

/// What the test server scrapes and evaluates.
#[derive(Debug, Clone)]
pub struct PromOptions {
    /// Scrape job name; the alert rules expect "stallmon".
    pub job: String,
    /// host:port targets of that job.
    pub targets: Vec<String>,
    /// Also scrape the server's own /metrics (job "prometheus").
    pub scrape_self: bool,
    /// Rule files to load (absolute paths).
    pub rule_files: Vec<PathBuf>,
    /// Scrape and rule evaluation interval.
    pub interval: Duration,
    /// How long to wait for the server to become ready.
    pub ready_timeout: Duration,
}

impl Default for PromOptions {
    fn default() -> Self {
        PromOptions {
            job: "stallmon".into(),
            targets: Vec::new(),
            scrape_self: false,
            rule_files: Vec::new(),
            interval: Duration::from_secs(1),
            ready_timeout: Duration::from_secs(60),
        }
    }
}

/// A running Prometheus server, killed on drop.
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    /// Starts a server scraping `target` (host:port) as job "stallmon" every second.
    pub fn start(target: &str) -> Result<Self> {
        Self::start_with(PromOptions {
            targets: vec![target.to_string()],
            ..PromOptions::default()
        })
    }

    /// Starts a server with the given options and waits until it is ready.
    pub fn start_with(opts: PromOptions) -> Result<Self> {
        let bin = prometheus_binary()?;
        // A port picked by the kernel can be taken by someone else before
        // Prometheus binds it: retry a few times.
        let mut last_err = None;
        for _ in 0..3 {
            match Self::try_start(&bin, &opts) {
                Ok(p) => return Ok(p),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap())
    }

    fn try_start(bin: &Path, opts: &PromOptions) -> Result<Self> {
        let port = free_port()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let dir = unique_temp_dir()?;
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, render_config(opts, addr))
            .with_context(|| format!("writing {}", config.display()))?;
        let log_path = dir.join("prometheus.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut prom = Prometheus { child, dir, addr };
        prom.wait_ready(opts.ready_timeout)?;
        Ok(prom)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "prometheus exited before becoming ready ({status}):\n{}",
                    self.log()
                );
            }
            if let Ok((200, _)) = http_get(self.addr, "/-/ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "prometheus not ready after {timeout:?} at {}:\n{}",
                    self.addr,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the server wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` (with query string) from the HTTP API; the parsed JSON body.
    /// Fails on HTTP errors and on `"status": "error"` answers.
    pub fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        let (status, body) = http_get(self.addr, path)?;
        let json: serde_json::Value = serde_json::from_slice(&body).with_context(|| {
            format!(
                "GET {path}: HTTP {status}, body is not JSON: {}",
                String::from_utf8_lossy(&body)
            )
        })?;
        if status != 200 || json["status"] != "success" {
            bail!(
                "GET {path}: HTTP {status}: {} {}",
                json["errorType"].as_str().unwrap_or(""),
                json["error"].as_str().unwrap_or(&json.to_string())
            );
        }
        Ok(json)
    }

    /// Evaluates an instant PromQL query now; returns the `data` object of the
    /// answer (`{"resultType": ..., "result": [...]}`).
    pub fn query(&self, promql: &str) -> Result<serde_json::Value> {
        let json = self.get_json(&format!("/api/v1/query?query={}", url_encode(promql)))?;
        Ok(json["data"].clone())
    }

    /// Evaluates a range query over the last `range` with the given `step`;
    /// returns the `data` object (a matrix).
    pub fn query_range(
        &self,
        promql: &str,
        range: Duration,
        step: Duration,
    ) -> Result<serde_json::Value> {
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        let start = end - range.as_secs_f64();
        let json = self.get_json(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={}",
            url_encode(promql),
            step.as_secs_f64()
        ))?;
        Ok(json["data"].clone())
    }

    /// The result of an instant query as (labels, value) pairs; fails if the
    /// result is not a vector.
    pub fn query_vector(
        &self,
        promql: &str,
    ) -> Result<Vec<(serde_json::Map<String, serde_json::Value>, f64)>> {
        let data = self.query(promql)?;
        if data["resultType"] != "vector" {
            bail!("{promql}: expected a vector, got {}", data["resultType"]);
        }
        data["result"]
            .as_array()
            .ok_or_else(|| anyhow!("{promql}: no result array"))?
            .iter()
            .map(|sample| {
                let labels = sample["metric"].as_object().cloned().unwrap_or_default();
                let value = sample["value"][1]
                    .as_str()
                    .ok_or_else(|| anyhow!("{promql}: sample without value: {sample}"))?
                    .parse::<f64>()?;
                Ok((labels, value))
            })
            .collect()
    }

    /// Polls `promql` (usually a metric name or selector) until the query
    /// returns at least one series; returns that answer's `data`.
    pub fn wait_for_series(&self, promql: &str, timeout: Duration) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let data = self.query(promql)?;
            if data["result"].as_array().is_some_and(|r| !r.is_empty()) {
                return Ok(data);
            }
            if Instant::now() > deadline {
                let targets = self
                    .get_json("/api/v1/targets")
                    .map(|t| t["data"]["activeTargets"].to_string())
                    .unwrap_or_else(|e| e.to_string());
                bail!("no series for {promql} after {timeout:?}; targets: {targets}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn render_config(opts: &PromOptions, own_addr: SocketAddr) -> String {
    let interval = format!("{}ms", opts.interval.as_millis().max(1));
    let mut cfg = format!(
        "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  \
         evaluation_interval: {interval}\n"
    );
    if !opts.rule_files.is_empty() {
        cfg.push_str("rule_files:\n");
        for f in &opts.rule_files {
            cfg.push_str(&format!("  - {}\n", yaml_quote(&f.display().to_string())));
        }
    }
    cfg.push_str("scrape_configs:\n");
    if !opts.targets.is_empty() {
        cfg.push_str(&format!(
            "  - job_name: {}\n    static_configs:\n      - targets: [{}]\n",
            yaml_quote(&opts.job),
            opts.targets
                .iter()
                .map(|t| yaml_quote(t))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if opts.scrape_self {
        cfg.push_str(&format!(
            "  - job_name: prometheus\n    static_configs:\n      - targets: ['{own_addr}']\n"
        ));
    }
    cfg
}

fn yaml_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn unique_temp_dir() -> Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "stallmon-prom-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// GET `path` from `addr` with HTTP/1.0; (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>)> {
    let timeout = Duration::from_secs(10);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading the answer to GET {path}"))?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("GET {path}: malformed HTTP answer"))?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("GET {path}: bad status line: {head}"))?;
    Ok((status, response[split + 4..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encoding() {
        assert_eq!(
            url_encode(r#"rate(x{a="b"}[1m]) > 0"#),
            "rate%28x%7Ba%3D%22b%22%7D%5B1m%5D%29%20%3E%200"
        );
        assert_eq!(url_encode("abc-_.~"), "abc-_.~");
    }

    #[test]
    fn series_names() {
        assert!(is_stallmon_series("stallmon_target_up"));
        assert!(is_stallmon_series(
            "stallmon_block_io_latency_seconds_bucket"
        ));
        assert!(is_stallmon_series("stallmon_read_latency_seconds_count"));
        assert!(!is_stallmon_series("stallmon_target_up_bucket"));
        assert!(!is_stallmon_series("stallmon_gpu_idle_seconds"));
    }

    #[test]
    fn config_renders() {
        let cfg = render_config(
            &PromOptions {
                targets: vec!["127.0.0.1:19435".into()],
                scrape_self: true,
                rule_files: vec![PathBuf::from("/x/alerts.yml")],
                ..PromOptions::default()
            },
            SocketAddr::from((Ipv4Addr::LOCALHOST, 1234)),
        );
        assert!(cfg.contains("scrape_interval: 1000ms"), "{cfg}");
        assert!(cfg.contains("job_name: 'stallmon'"), "{cfg}");
        assert!(cfg.contains("targets: ['127.0.0.1:19435']"), "{cfg}");
        assert!(cfg.contains("targets: ['127.0.0.1:1234']"), "{cfg}");
        assert!(cfg.contains("  - '/x/alerts.yml'"), "{cfg}");
    }
}
