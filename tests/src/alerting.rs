//! End-to-end alert delivery for tests: a real Prometheus evaluating the project's rules and
//! sending to a real Alertmanager, which delivers to a webhook receiver run by the test.
//!
//! - [`WebhookReceiver`]: a tiny HTTP server on 127.0.0.1 that keeps every JSON body POSTed to it
//!   (what an Alertmanager `webhook_configs` receiver gets);
//! - [`Alertmanager`]: the `alertmanager` binary (Debian package `prometheus-alertmanager`,
//!   installed by [`alertmanager_binary`] if missing; `$STALLMON_ALERTMANAGER` names another),
//!   on a free loopback port, clustering disabled, private data directory, routing everything to
//!   one webhook with 1-second grouping;
//! - [`AlertingPrometheus`]: `prometheus` (found by [`crate::prom::prometheus_binary`]) scraping
//!   the targets every interval, evaluating the rule files at the same interval and sending alerts
//!   to the Alertmanager;
//! - [`rules_for_tests`]: a copy of a rule file with time scaled down (every `for:`, range
//!   selector and group `interval:`), since the real `for: 10m` over `rate(...[10m])` would make
//!   a test wait more than ten minutes.
//!
//! Every process is killed and every temporary directory removed on drop; every wait has a
//! deadline.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::prom;

/// Whether this run is CI's (`CI=true`): there, a missing tool fails a test instead of skipping it.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A required tool is missing: panics under CI, otherwise prints a visible skip notice and
/// returns `None` (callers `return` on it).
pub fn missing_tool<T>(what: &str) -> Option<T> {
    if ci() {
        panic!("CI=true: {what} (a missing tool is a failure under CI, never a skip)");
    }
    eprintln!("\n*** SKIPPED (not CI): {what} ***\n");
    None
}

fn unique_temp_dir(prefix: &str) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

fn yaml_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A child process killed (and reaped) on drop, with its log file.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Result<Self> {
        let file = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Self { child, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `GET path` on `addr` until it answers 200, the process exits, or `timeout`.
    fn wait_ready(
        &mut self,
        what: &str,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{what} exited before becoming ready ({status}):\n{}",
                    self.log()
                );
            }
            if let Ok((200, _)) = prom::http_get(addr, path) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{what} not ready after {timeout:?} at {addr}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ webhook receiver

/// An HTTP server on 127.0.0.1 that stores every POSTed JSON body; stopped on drop.
pub struct WebhookReceiver {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<serde_json::Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Largest request body accepted (an Alertmanager notification is a few kilobytes).
const MAX_BODY: usize = 1 << 20;

impl WebhookReceiver {
    pub fn start() -> Result<Self> {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the webhook")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let received = received.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("webhook-receiver".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((stream, _)) => {
                                if let Err(e) = handle(stream, &received) {
                                    eprintln!("webhook receiver: {e:#}");
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            Err(e) => {
                                eprintln!("webhook receiver: accept: {e}");
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                })?
        };
        Ok(Self {
            addr,
            received,
            stop,
            thread: Some(thread),
        })
    }

    /// The URL to configure as the webhook (`http://127.0.0.1:PORT/alerts`).
    pub fn url(&self) -> String {
        format!("http://{}/alerts", self.addr)
    }

    /// Every body received so far.
    pub fn received(&self) -> Vec<serde_json::Value> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until a received body satisfies `pred`; that body, or `None` after `timeout`.
    /// `tick` is called about once a second while waiting (progress output, liveness checks);
    /// an error from it ends the wait.
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
        mut tick: impl FnMut() -> Result<()>,
    ) -> Result<Option<serde_json::Value>> {
        let deadline = Instant::now() + timeout;
        let mut next_tick = Instant::now();
        loop {
            if let Some(v) = self.received().into_iter().find(|v| pred(v)) {
                return Ok(Some(v));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            if Instant::now() >= next_tick {
                tick()?;
                next_tick = Instant::now() + Duration::from_secs(1);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP/1.x request: headers, a `Content-Length` body, a 200 answer, close.
fn handle(mut stream: TcpStream, received: &Mutex<Vec<serde_json::Value>>) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > 64 * 1024 {
            bail!("request head too large");
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed before the end of the request head");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| anyhow!("no Content-Length in {head:?}"))?;
    if len > MAX_BODY {
        bail!("body of {len} bytes refused");
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed in the body");
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    let ok = head.starts_with("POST ");
    let answer: &[u8] = if ok {
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    } else {
        b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    };
    stream.write_all(answer)?;
    if ok {
        let json: serde_json::Value =
            serde_json::from_slice(&body).context("the webhook body is not JSON")?;
        received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(json);
    }
    Ok(())
}

// ------------------------------------------------------------------ Alertmanager

/// The Alertmanager binary: `$STALLMON_ALERTMANAGER`, else `prometheus-alertmanager` (Debian's
/// name) or `alertmanager` on PATH; when neither exists, installs the Debian package
/// `prometheus-alertmanager` (needs root and the package index; the service the package enables
/// is not started in containers, and none of its state is used).
pub fn alertmanager_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("STALLMON_ALERTMANAGER") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!(
            "$STALLMON_ALERTMANAGER names {}, which is not a file",
            p.display()
        );
    }
    let find = || {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .flat_map(|d| [d.join("prometheus-alertmanager"), d.join("alertmanager")])
            .find(|c| c.is_file())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    eprintln!("installing the Debian package prometheus-alertmanager");
    let install = |args: &[&str]| {
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(args)
            .output()
    };
    let _ = install(&["update", "-qq"]);
    let out = install(&[
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        "prometheus-alertmanager",
    ])
    .context("running apt-get")?;
    if !out.status.success() {
        bail!(
            "apt-get install prometheus-alertmanager failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    find().ok_or_else(|| anyhow!("prometheus-alertmanager installed but not found on PATH"))
}

/// How Alertmanager groups and delivers in tests.
#[derive(Clone, Debug)]
pub struct AlertmanagerOptions {
    /// group_wait and group_interval.
    pub group_wait: Duration,
    pub ready_timeout: Duration,
}

impl Default for AlertmanagerOptions {
    fn default() -> Self {
        Self {
            group_wait: Duration::from_secs(1),
            ready_timeout: Duration::from_secs(60),
        }
    }
}

/// A running Alertmanager sending every alert to one webhook; killed on drop.
pub struct Alertmanager {
    proc: Proc,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Alertmanager {
    pub fn start(webhook_url: &str, opts: AlertmanagerOptions) -> Result<Self> {
        let bin = alertmanager_binary()?;
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(&bin, webhook_url, &opts) {
                Ok(am) => return Ok(am),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap())
    }

    fn try_start(bin: &Path, webhook_url: &str, opts: &AlertmanagerOptions) -> Result<Self> {
        let dir = unique_temp_dir("stallmon-am")?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let config = dir.join("alertmanager.yml");
        std::fs::write(
            &config,
            render_alertmanager_config(webhook_url, opts.group_wait),
        )?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            // No clustering: no gossip port, no peers.
            .arg("--cluster.listen-address=")
            .arg("--log.level=warn")
            .current_dir(&dir);
        let proc = Proc::spawn(&mut cmd, dir.join("alertmanager.log"));
        let mut am = match proc {
            Ok(proc) => Alertmanager { proc, dir, addr },
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        am.proc
            .wait_ready("alertmanager", addr, "/-/ready", opts.ready_timeout)?;
        Ok(am)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// The alerts Alertmanager currently holds (API v2), for diagnostics.
    pub fn alerts(&self) -> Result<serde_json::Value> {
        let (code, body) = prom::http_get(self.addr, "/api/v2/alerts")?;
        if code != 200 {
            bail!("GET /api/v2/alerts: HTTP {code}");
        }
        Ok(serde_json::from_slice(&body)?)
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn render_alertmanager_config(webhook_url: &str, group_wait: Duration) -> String {
    let wait = format!("{}ms", group_wait.as_millis().max(1));
    format!(
        "route:\n  receiver: webhook\n  group_by: ['alertname', 'instance', 'job_name']\n  \
         group_wait: {wait}\n  group_interval: {wait}\n  repeat_interval: 1h\n\
         receivers:\n  - name: webhook\n    webhook_configs:\n      - url: {}\n        \
         send_resolved: false\n",
        yaml_quote(webhook_url)
    )
}

// ------------------------------------------------------------------ Prometheus with alerting

/// A Prometheus server that scrapes job "stallmon", evaluates rules and notifies an
/// Alertmanager; killed on drop.
pub struct AlertingPrometheus {
    proc: Proc,
    dir: PathBuf,
    addr: SocketAddr,
}

impl AlertingPrometheus {
    /// Scrapes `targets` as job "stallmon" and evaluates `rule_files` every `interval`, sending
    /// alerts to the Alertmanager at `alertmanager`.
    pub fn start(
        targets: &[String],
        rule_files: &[PathBuf],
        alertmanager: SocketAddr,
        interval: Duration,
    ) -> Result<Self> {
        let bin = prom::prometheus_binary()?;
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(&bin, targets, rule_files, alertmanager, interval) {
                Ok(p) => return Ok(p),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap())
    }

    fn try_start(
        bin: &Path,
        targets: &[String],
        rule_files: &[PathBuf],
        alertmanager: SocketAddr,
        interval: Duration,
    ) -> Result<Self> {
        let dir = unique_temp_dir("stallmon-prom-alerting")?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            render_prometheus_config(targets, rule_files, alertmanager, interval),
        )?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .current_dir(&dir);
        let proc = match Proc::spawn(&mut cmd, dir.join("prometheus.log")) {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut p = AlertingPrometheus { proc, dir, addr };
        p.proc
            .wait_ready("prometheus", addr, "/-/ready", Duration::from_secs(60))?;
        Ok(p)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// `GET path` of the HTTP API, parsed; fails unless `"status": "success"`.
    pub fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        let (code, body) = prom::http_get(self.addr, path)?;
        let json: serde_json::Value = serde_json::from_slice(&body)
            .with_context(|| format!("GET {path}: HTTP {code}, not JSON"))?;
        if code != 200 || json["status"] != "success" {
            bail!("GET {path}: HTTP {code}: {json}");
        }
        Ok(json)
    }

    /// An instant query's result vector.
    pub fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>> {
        let json = self.get_json(&format!("/api/v1/query?query={}", prom::url_encode(promql)))?;
        Ok(json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The alerts Prometheus holds (pending and firing), for progress output.
    pub fn alerts(&self) -> Result<Vec<serde_json::Value>> {
        let json = self.get_json("/api/v1/alerts")?;
        Ok(json["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for AlertingPrometheus {
    fn drop(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn render_prometheus_config(
    targets: &[String],
    rule_files: &[PathBuf],
    alertmanager: SocketAddr,
    interval: Duration,
) -> String {
    let iv = format!("{}ms", interval.as_millis().max(1));
    let mut cfg = format!(
        "global:\n  scrape_interval: {iv}\n  scrape_timeout: {iv}\n  evaluation_interval: {iv}\n\
         alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{alertmanager}']\n"
    );
    if !rule_files.is_empty() {
        cfg.push_str("rule_files:\n");
        for f in rule_files {
            cfg.push_str(&format!("  - {}\n", yaml_quote(&f.display().to_string())));
        }
    }
    cfg.push_str(&format!(
        "scrape_configs:\n  - job_name: 'stallmon'\n    static_configs:\n      - targets: [{}]\n",
        targets
            .iter()
            .map(|t| yaml_quote(t))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    cfg
}

/// How a test copy of a rule file is sped up (see [`rules_for_tests`]).
#[derive(Clone, Copy, Debug)]
pub struct RuleTiming {
    /// Every alert's `for:`.
    pub for_: Duration,
    /// Every range selector in every expression (`rate(x[10m])` -> `rate(x[20s])`).
    pub range: Duration,
    /// Every group's `interval:`, where one is set.
    pub interval: Duration,
}

/// What [`rules_for_tests`] changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewritten {
    pub fors: usize,
    pub ranges: usize,
}

/// Copies the rule file `src` to `dest` with time scaled down for a test: every alert's `for:`,
/// every range selector of every expression and every group `interval:` set from `timing`.
/// Expressions are otherwise unchanged, as are labels and annotations.
///
/// Both matter: with `for: 10m` an alert needs ten minutes, and a `rate(x[10m])` over a series
/// that exists for only `t` seconds is about `t / 600` of the real rate (the increase is divided
/// by the whole window), so a threshold like "idle more than 20% of the time" is only crossed
/// minutes later.
pub fn rules_for_tests(src: &Path, dest: &Path, timing: RuleTiming) -> Result<Rewritten> {
    use serde_yaml::Value;
    let text =
        std::fs::read_to_string(src).with_context(|| format!("reading {}", src.display()))?;
    let mut doc: Value = serde_yaml::from_str(&text)?;
    let dur = |d: Duration| format!("{}ms", d.as_millis().max(1));
    let mut done = Rewritten { fors: 0, ranges: 0 };
    let groups = doc["groups"]
        .as_sequence_mut()
        .ok_or_else(|| anyhow!("{}: no groups", src.display()))?;
    for group in groups {
        let Some(g) = group.as_mapping_mut() else {
            continue;
        };
        if g.contains_key("interval") {
            g.insert("interval".into(), Value::String(dur(timing.interval)));
        }
        let Some(rules) = g.get_mut("rules").and_then(Value::as_sequence_mut) else {
            continue;
        };
        for rule in rules {
            let Some(r) = rule.as_mapping_mut() else {
                continue;
            };
            if r.contains_key("for") {
                r.insert("for".into(), Value::String(dur(timing.for_)));
                done.fors += 1;
            }
            if let Some(expr) = r.get("expr").and_then(Value::as_str) {
                let (expr, n) = replace_ranges(expr, &dur(timing.range));
                done.ranges += n;
                r.insert("expr".into(), Value::String(expr));
            }
        }
    }
    std::fs::write(dest, serde_yaml::to_string(&doc)?)
        .with_context(|| format!("writing {}", dest.display()))?;
    Ok(done)
}

/// `expr` with every range selector `[<duration>]` (not subqueries `[a:b]`, not inside string
/// literals) replaced by `[range]`; and how many were replaced.
fn replace_ranges(expr: &str, range: &str) -> (String, usize) {
    let mut out = String::with_capacity(expr.len());
    let mut n = 0;
    let mut quote: Option<char> = None;
    let mut chars = expr.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match quote {
            Some(q) => {
                out.push(c);
                if c == '\\' && q != '`' {
                    if let Some((_, e)) = chars.next() {
                        out.push(e);
                    }
                } else if c == q {
                    quote = None;
                }
            }
            None if c == '"' || c == '\'' || c == '`' => {
                quote = Some(c);
                out.push(c);
            }
            None if c == '[' => {
                let rest = &expr[i + 1..];
                match rest.find(']') {
                    Some(end)
                        if end > 0 && rest[..end].chars().all(|d| d.is_ascii_alphanumeric()) =>
                    {
                        out.push('[');
                        out.push_str(range);
                        out.push(']');
                        n += 1;
                        for _ in 0..end + 1 {
                            chars.next();
                        }
                    }
                    _ => out.push(c),
                }
            }
            None => out.push(c),
        }
    }
    (out, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alertmanager_config_renders() {
        let c = render_alertmanager_config("http://127.0.0.1:1/alerts", Duration::from_secs(1));
        assert!(c.contains("url: 'http://127.0.0.1:1/alerts'"), "{c}");
        assert!(c.contains("group_wait: 1000ms"), "{c}");
        assert!(c.contains("group_interval: 1000ms"), "{c}");
    }

    #[test]
    fn prometheus_config_renders() {
        let c = render_prometheus_config(
            &["127.0.0.1:9".into()],
            &[PathBuf::from("/r/alerts.yml")],
            SocketAddr::from((Ipv4Addr::LOCALHOST, 9093)),
            Duration::from_secs(1),
        );
        assert!(c.contains("- targets: ['127.0.0.1:9093']"), "{c}");
        assert!(c.contains("evaluation_interval: 1000ms"), "{c}");
        assert!(c.contains("- '/r/alerts.yml'"), "{c}");
        assert!(c.contains("job_name: 'stallmon'"), "{c}");
    }

    #[test]
    fn short_for_copies() {
        let dir = unique_temp_dir("stallmon-rules-test").unwrap();
        let src = dir.join("a.yml");
        std::fs::write(
            &src,
            "groups:\n  - name: g\n    interval: 30s\n    rules:\n      - alert: A\n        expr: rate(up[10m]) == 0\n        for: 10m\n        annotations:\n          summary: x\n      - record: r\n        expr: up\n",
        )
        .unwrap();
        let dest = dir.join("b.yml");
        let timing = RuleTiming {
            for_: Duration::from_secs(5),
            range: Duration::from_secs(20),
            interval: Duration::from_secs(1),
        };
        let n = rules_for_tests(&src, &dest, timing).unwrap();
        let out = std::fs::read_to_string(&dest).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(n, Rewritten { fors: 1, ranges: 1 });
        assert!(out.contains("for: 5000ms"), "{out}");
        assert!(out.contains("interval: 1000ms"), "{out}");
        assert!(out.contains("summary: x"), "{out}");
        assert!(out.contains("rate(up[20000ms])"), "{out}");
    }

    #[test]
    fn range_selectors_are_replaced() {
        let (e, n) = replace_ranges(
            r#"rate(a{x="[5m]"}[5m]) / rate(b[1h]) + max_over_time(c[10m:1m])"#,
            "20s",
        );
        assert_eq!(
            e,
            r#"rate(a{x="[5m]"}[20s]) / rate(b[20s]) + max_over_time(c[10m:1m])"#
        );
        assert_eq!(n, 2);
    }

    #[test]
    fn webhook_receives_posts() {
        let hook = WebhookReceiver::start().unwrap();
        let addr: SocketAddr = hook
            .url()
            .trim_start_matches("http://")
            .trim_end_matches("/alerts")
            .parse()
            .unwrap();
        let body = br#"{"alerts":[{"labels":{"alertname":"X"}}]}"#;
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST /alerts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let got = hook
            .wait_for(
                Duration::from_secs(5),
                |v| v["alerts"][0]["labels"]["alertname"] == "X",
                || Ok(()),
            )
            .unwrap();
        assert!(got.is_some());
    }
}
