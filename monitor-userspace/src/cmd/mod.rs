//! The commands that trace (`trace`, `node`) and what they share: the HTTP endpoint, the ready
//! signal (a file, and systemd's notify socket), the clock loop, the summary at the end.
pub mod node;
pub mod trace;

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    cli::{BlockIssueTime, CommonArgs},
    console,
    exporter::{http, metrics},
    kernel::LoadOptions,
    preflight, record,
    schema::{ready::Ready, summary::Summary},
    session::{FINE_TICK, Session},
};

/// The host checks both commands make first: settings worth a warning, privileges, BTF, tracefs.
pub fn check_host(c: &CommonArgs) -> Result<()> {
    for w in c.warnings() {
        tracing::warn!("{w}");
    }
    preflight::privileges()?;
    preflight::btf()?;
    preflight::tracefs(true)?;
    Ok(())
}

/// What both commands open before anything is loaded or started, so that a bad path or a
/// busy port fails first: the record file, the ready file's directory, the listening socket.
pub struct Outputs {
    pub recorder: Option<record::Recorder>,
    pub listener: std::net::TcpListener,
}

pub fn open_outputs(c: &CommonArgs) -> Result<Outputs> {
    let recorder = match &c.record {
        Some(p) => Some(record::Recorder::new(record::open(p, c.record_append)?, p)),
        None => None,
    };
    if let Some(p) = &c.ready_file {
        check_ready_path(p)?;
    }
    Ok(Outputs {
        recorder,
        listener: http::bind(c.listen)?,
    })
}

/// The kernel programs' options from the flags.
pub fn load_options(c: &CommonArgs) -> LoadOptions {
    LoadOptions {
        syscalls: c.syscalls,
        slots: c.max_ranks,
        probe_issue_time: c.block_issue_time == BlockIssueTime::Probe,
    }
}

/// Writes the ready file atomically (a new private file renamed over the path: a link planted
/// at the path is replaced, never followed).
pub fn write_ready(path: &Path, ready: &Ready) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("ready file {}", tmp.display()))?;
    f.write_all(serde_json::to_string(ready)?.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("ready file {}", path.display()))?;
    Ok(())
}

/// Checks at start that the ready file's directory exists.
pub fn check_ready_path(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    anyhow::ensure!(
        dir.is_dir(),
        "ready file {}: directory {} does not exist",
        path.display(),
        dir.display()
    );
    Ok(())
}

/// The endpoint, running.
pub struct Endpoint {
    pub addr: std::net::SocketAddr,
    pub view: metrics::SharedView,
    pub health: Arc<http::Health>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    pub fn start(listener: std::net::TcpListener, interval: Duration) -> Result<Self> {
        let addr = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let view: metrics::SharedView = Arc::new(RwLock::new(metrics::View::default()));
        let health = http::Health::new(interval * 3 + Duration::from_secs(10));
        let registry = metrics::registry(view.clone())?;
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(http::serve(listener, registry, health.clone(), rx));
        Ok(Self {
            addr,
            view,
            health,
            shutdown,
            task,
        })
    }

    /// Graceful shutdown: no new connections, requests in flight finish.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(http::DRAIN + Duration::from_secs(1), self.task).await;
    }
}

/// Why the loop ended.
pub enum Stop {
    Signal(&'static str),
    Duration,
    /// The command's decision (its target exited).
    Done,
}

/// The watchdog ping period (half of `WATCHDOG_USEC`), with libsystemd's rule: the watchdog is
/// ours unless `WATCHDOG_PID` names another process.
fn watchdog_period(usec: Option<&str>, pid: Option<&str>, own: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(p) = pid
        && p.trim().parse::<u32>().ok() != Some(own)
    {
        return None;
    }
    Some(Duration::from_micros(usec) / 2)
}

/// systemd: READY=1 once tracing, WATCHDOG=1 while the loop runs (when the unit asks for it).
struct Systemd {
    watchdog: Option<Duration>,
    last: Instant,
}

impl Systemd {
    fn ready() -> Self {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        Self {
            watchdog: watchdog_period(
                std::env::var("WATCHDOG_USEC").ok().as_deref(),
                std::env::var("WATCHDOG_PID").ok().as_deref(),
                std::process::id(),
            ),
            last: Instant::now(),
        }
    }

    fn ping(&mut self) {
        if let Some(every) = self.watchdog
            && self.last.elapsed() >= every
        {
            self.last = Instant::now();
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
    }

    fn stopping() {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }
}

/// Runs the clock until a signal, `--duration`, or `done` says so.
pub async fn run_loop(
    session: &mut Session,
    interval: Duration,
    duration: Option<Duration>,
    ready_file: Option<&PathBuf>,
    ready: Ready,
    mut done: impl FnMut(&Session) -> bool,
) -> Result<Stop> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // Figures exist from the first moment (series appear at once, whatever the interval).
    session.interval_tick();
    if let Some(p) = ready_file {
        write_ready(p, &ready)?;
    }
    let mut systemd = Systemd::ready();
    let started = Instant::now();
    let mut fine = tokio::time::interval(FINE_TICK);
    fine.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_interval = Instant::now();
    let stop = loop {
        tokio::select! {
            _ = fine.tick() => {}
            _ = sigint.recv() => break Stop::Signal("interrupted"),
            _ = sigterm.recv() => break Stop::Signal("terminated"),
        }
        session.fine_tick();
        if last_interval.elapsed() >= interval {
            last_interval = Instant::now();
            session.interval_tick();
        }
        systemd.ping();
        if done(session) {
            break Stop::Done;
        }
        if duration.is_some_and(|d| started.elapsed() >= d) {
            break Stop::Duration;
        }
    };
    Systemd::stopping();
    Ok(stop)
}

/// Prints the summary: JSON on stdout, or the table on stderr.
pub fn print_summary(summary: &Summary, json: bool) {
    if json {
        let text = serde_json::to_string_pretty(summary).unwrap_or_default();
        console::out(&format!("{text}\n"));
    } else {
        console::err(&crate::summary::human(summary));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::watchdog_period;

    #[test]
    fn watchdog_follows_libsystemd() {
        let half = Some(Duration::from_millis(500));
        assert_eq!(watchdog_period(Some("1000000"), None, 7), half);
        assert_eq!(watchdog_period(Some("1000000"), Some("7"), 7), half);
        assert_eq!(watchdog_period(Some("1000000"), Some("8"), 7), None);
        assert_eq!(watchdog_period(Some("1000000"), Some("x"), 7), None);
        assert_eq!(watchdog_period(Some("0"), None, 7), None);
        assert_eq!(watchdog_period(Some("soon"), None, 7), None);
        assert_eq!(watchdog_period(None, Some("7"), 7), None);
    }
}
