//! `stallmon trace`: wires the stages together and runs the clock.
//!
//! kernel probes -> maps -> [`Collector`] -> (attribution) -> exporters (`/metrics`, record
//! file, exit summary). Two clocks: a fine tick (100 ms) for the attribution inputs, and the
//! user's `--interval` for full snapshots.
use std::{
    ffi::OsString,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use monitor_common::{ROLE_FEEDER, ROLE_WORKER};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    collector::Collector,
    exporter::{MetricsState, SharedState, http, metrics},
    job, joblabel,
    kernel::Kernel,
    pipeline::GpuPipeline,
    preflight,
    record::Recorder,
    summary::Summary,
};

pub struct TraceArgs {
    pub pid: Option<u32>,
    pub command: Vec<OsString>,
    pub listen: SocketAddr,
    pub interval: Duration,
    pub duration: Option<Duration>,
    pub record: Option<PathBuf>,
    pub json: bool,
    pub feeder_tid: Option<u32>,
    pub job_name: Option<String>,
    pub gpus: Option<Vec<u32>>,
    pub no_gpu: bool,
    pub simulate_gpu: Option<PathBuf>,
}

const FINE_TICK: Duration = Duration::from_millis(100);

enum Target {
    Attached(u32),
    Started(job::Gated),
}

impl Target {
    fn pid(&self) -> u32 {
        match self {
            Target::Attached(p) => *p,
            Target::Started(g) => g.pid(),
        }
    }

    /// Some(exit status) once the target has exited.
    fn exited(&mut self, kernel_says_alive: bool) -> Option<Option<i32>> {
        match self {
            Target::Started(g) => match g.child.try_wait() {
                Ok(Some(status)) => Some(Some(exit_code(status))),
                Ok(None) => None,
                Err(_) => Some(None),
            },
            Target::Attached(pid) => {
                // SAFETY: signal 0 only checks for existence.
                let alive = unsafe { libc::kill(*pid as i32, 0) } == 0
                    || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
                let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
                    .unwrap_or(true);
                (!alive || zombie || !kernel_says_alive).then_some(None)
            }
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Everything privileged happens here, before the async runtime starts any thread: bind the
/// port, start or check the target, load and attach the programs, track the job, then drop the
/// capabilities that are no longer needed (capabilities are per thread, so this must happen
/// while the process is single-threaded).
pub fn run(args: TraceArgs) -> Result<i32> {
    preflight::privileges()?;
    preflight::btf()?;
    preflight::tracefs(true)?;
    if let Some(pid) = args.pid {
        job::check_pid(pid)?;
    }
    if args.pid.is_none() {
        job::resolve_program(args.command.first().context("no command given after --")?)?;
    }
    let listener = http::bind_std(args.listen)?;

    // Load and attach before the target is tracked, track before scanning for descendants:
    // a fork at any moment is then either seen by the probe or found by the scan.
    let mut target = match args.pid {
        Some(pid) => Target::Attached(pid),
        None => Target::Started(job::spawn_gated(&args.command)?),
    };
    let pid = target.pid();
    let feeder_tid = args.feeder_tid.unwrap_or(pid);
    let kernel = match Kernel::load(feeder_tid) {
        Ok(k) => k,
        Err(e) => {
            if let Target::Started(g) = &mut target {
                let _ = g.child.kill();
                let _ = g.child.wait();
            }
            return Err(e);
        }
    };
    let mut collector = Collector::new(kernel, pid);
    collector.kernel_mut().track(pid, ROLE_FEEDER, 0)?;
    for (child, parent) in job::descendants(pid) {
        collector.kernel_mut().track(child, ROLE_WORKER, parent)?;
    }
    if let Target::Started(g) = &mut target {
        g.release()?;
    } else if job::check_pid(pid).is_err() {
        anyhow::bail!("PID {pid} exited before tracing started");
    }
    let mut job_name = joblabel::job_name(args.job_name.as_deref(), pid);
    if args.job_name.is_none()
        && matches!(target, Target::Started(_))
        && job_name == "stallmon"
        && let Some(name) = args
            .command
            .first()
            .and_then(|c| std::path::Path::new(c).file_name())
    {
        // The command has not exec'd yet, so its comm is still ours: name it after the command.
        job_name = name.to_string_lossy().into_owned();
    }
    crate::privileges::drop_capabilities_after_attach()
        .context("dropping capabilities after attach")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_traced(args, target, collector, listener, job_name))
}

async fn run_traced(
    args: TraceArgs,
    mut target: Target,
    mut collector: Collector,
    listener: std::net::TcpListener,
    job_name: String,
) -> Result<i32> {
    let pid = target.pid();
    let feeder_tid = args.feeder_tid.unwrap_or(pid);
    let local = listener.local_addr()?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    eprintln!(
        "stallmon: tracing PID {pid} (job \"{job_name}\"); metrics on http://{local}/metrics"
    );

    let mut gpu = GpuPipeline::start(&args, pid);
    if let Some(why) = gpu.disabled_reason() {
        eprintln!("stallmon: {why}");
    }

    let state: SharedState = Arc::new(RwLock::new(MetricsState {
        job_name: job_name.clone(),
        gpu_source: gpu.source(),
        ..MetricsState::default()
    }));
    let registry = metrics::registry(state.clone())?;
    let server = tokio::spawn(http::serve(listener, registry));

    let mut recorder = match &args.record {
        Some(p) => Some(Recorder::create(p)?),
        None => None,
    };
    let started = Instant::now();
    if let Some(r) = &mut recorder {
        r.line(&serde_json::json!({
            "type": "header",
            "version": 1,
            "stallmon": env!("CARGO_PKG_VERSION"),
            "target_pid": pid,
            "feeder_tid": feeder_tid,
            "job_name": job_name,
            "command": args.command.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>(),
            "start_mono_ns": crate::collector::monotonic_ns(),
            "interval_s": args.interval.as_secs_f64(),
            "gpu_source": gpu.source(),
        }))?;
    }

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut fine = tokio::time::interval(FINE_TICK);
    fine.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut prev_snapshot = None;
    let mut last_snapshot_at = Instant::now();
    let mut exit_status: Option<i32> = None;
    let mut stop_reason = "target exited";

    loop {
        tokio::select! {
            _ = fine.tick() => {}
            _ = sigint.recv() => { stop_reason = "interrupted"; break; }
            _ = sigterm.recv() => { stop_reason = "terminated"; break; }
        }
        gpu.fine_tick(&mut collector, recorder.as_mut())?;
        let due = last_snapshot_at.elapsed() >= args.interval;
        if due {
            last_snapshot_at = Instant::now();
            let snap = collector.snapshot()?;
            gpu.interval_tick(&snap, recorder.as_mut())?;
            if let Some(r) = &mut recorder {
                r.interval(prev_snapshot.as_ref(), &snap)?;
            }
            if let Ok(mut s) = state.write() {
                s.snapshot = Some(snap.clone());
                s.gpus = gpu.metrics();
            }
            prev_snapshot = Some(snap);
        }
        let kernel_alive = prev_snapshot.as_ref().is_none_or(|s| s.target_alive);
        if let Some(status) = target.exited(kernel_alive) {
            exit_status = status;
            break;
        }
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            stop_reason = "duration reached";
            break;
        }
    }

    // Final read: everything up to now, then the summary.
    gpu.fine_tick(&mut collector, recorder.as_mut())?;
    let snap = collector.snapshot()?;
    gpu.finish(recorder.as_mut())?;
    if let Some(r) = &mut recorder {
        r.interval(prev_snapshot.as_ref(), &snap)?;
    }
    if let Ok(mut s) = state.write() {
        s.snapshot = Some(snap.clone());
        s.gpus = gpu.metrics();
    }
    server.abort();

    if let Target::Started(g) = &mut target
        && exit_status.is_none()
    {
        exit_status = Some(stop_child(&mut g.child));
    }
    let mut summary =
        Summary::from_snapshot(&snap, started.elapsed().as_secs_f64(), pid, &job_name);
    summary.target_exit_status = exit_status;
    gpu.fill_summary(&mut summary);
    if let Some(r) = &mut recorder {
        r.line(&serde_json::json!({ "type": "summary", "summary": &summary }))?;
        r.flush()?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        eprint!("{}", summary.human());
    }
    eprintln!("stallmon: stopped ({stop_reason})");
    Ok(match target {
        Target::Started(_) => exit_status.unwrap_or(1),
        Target::Attached(_) => 0,
    })
}

/// Stops the job we started: SIGTERM to the command and every live descendant (DataLoader
/// workers would otherwise be orphaned, still holding our stdout), SIGKILL to what is left after
/// 5 s. Returns the command's status.
fn stop_child(child: &mut std::process::Child) -> i32 {
    if let Ok(Some(s)) = child.try_wait() {
        return exit_code(s);
    }
    let root = child.id();
    let job: Vec<u32> = std::iter::once(root)
        .chain(job::descendants(root).into_iter().map(|(p, _)| p))
        .collect();
    let signal_all = |sig| {
        for &p in &job {
            // SAFETY: signalling processes of the job we started.
            unsafe { libc::kill(p as i32, sig) };
        }
    };
    signal_all(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut status = None;
    while Instant::now() < deadline {
        if status.is_none()
            && let Ok(Some(s)) = child.try_wait()
        {
            status = Some(exit_code(s));
        }
        let alive = job[1..]
            .iter()
            .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if status.is_some() && !alive {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    signal_all(libc::SIGKILL);
    status.unwrap_or_else(|| child.wait().map(exit_code).unwrap_or(1))
}
