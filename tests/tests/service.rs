//! stallmon as a service: the systemd notify protocol (ready, watchdog, stopping), `/healthz` and
//! the figures surviving a hung GPU driver, the revision in `--version` and
//! `stallmon_build_info`, GPUs chosen by UUID, JSON logs, and every setting from the
//! environment.
//!
//! Privileged: these tests fail, never skip, when they cannot run. About 40 s in all.
use std::{
    os::unix::net::UnixDatagram,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tests::{
    Tracer, gpu::StandinGpus, procs::Reaper, python, require_privileged, scratch_dir, stallmon_bin,
    workload,
};

/// The job of `gpu_job.py` on stand-in GPU `gpu`, as the argument list of `stallmon trace --`.
fn gpu_job(gpus: &StandinGpus, gpu: u32, seconds: f64, started: &Path) -> Vec<String> {
    vec![
        "--".into(),
        python().to_string_lossy().into_owned(),
        workload("gpu_job.py").to_string_lossy().into_owned(),
        "--gpu-dir".into(),
        gpus.path().to_string_lossy().into_owned(),
        "--gpu-index".into(),
        gpu.to_string(),
        "--seconds".into(),
        seconds.to_string(),
        "--started".into(),
        started.to_string_lossy().into_owned(),
    ]
}

/// `stallmon_gpu_stale` of GPU 0, if exposed.
fn gpu0_stale(text: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with("stallmon_gpu_stale{gpu=\"0\""))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

fn launch(sub: &str, args: &[String], env: &[(&str, &std::ffi::OsStr)]) -> Tracer {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Tracer::launch(sub, &refs, env).unwrap()
}

/// Receives datagrams until `until` holds for the list so far or `timeout` passes.
fn notifications(
    sock: &UnixDatagram,
    timeout: Duration,
    until: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !until(&got) {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

/// `Type=notify` with `WatchdogSec=`: READY=1 once the endpoint serves, WATCHDOG=1 at half the
/// watchdog period while the loop runs, STOPPING=1 on SIGTERM.
#[test]
fn systemd_hears_ready_watchdog_and_stopping() {
    require_privileged();
    let dir = scratch_dir("notify");
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).unwrap();
    let sleeper = Reaper(Command::new("sleep").arg("60").spawn().unwrap());
    let pid = sleeper.pid().to_string();
    let tracer = launch(
        "trace",
        &["--pid".into(), pid, "--no-gpu".into()],
        &[
            ("NOTIFY_SOCKET", path.as_os_str()),
            ("WATCHDOG_USEC", "1000000".as_ref()),
        ],
    );
    let got = notifications(&sock, Duration::from_secs(5), |g| {
        g.iter().any(|m| m.contains("READY=1"))
    });
    assert!(got.iter().any(|m| m.contains("READY=1")), "{got:?}");
    // Ready means the endpoint answers.
    let (code, _) = tests::prom::http_get(tracer.addr, "/healthz").unwrap();
    assert_eq!(code, 200);
    // A 1 s watchdog: a ping every 0.5 s.
    let t0 = Instant::now();
    let pings = notifications(&sock, Duration::from_secs(3), |_| false)
        .iter()
        .filter(|m| m.contains("WATCHDOG=1"))
        .count();
    let per_s = pings as f64 / t0.elapsed().as_secs_f64();
    println!(
        "{pings} watchdog pings in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!((1.5..=4.0).contains(&per_s), "{per_s} pings/s");
    // SIGTERM: STOPPING=1, then a clean exit.
    unsafe { libc::kill(tracer.pid() as i32, libc::SIGTERM) };
    let got = notifications(&sock, Duration::from_secs(5), |g| {
        g.iter().any(|m| m.contains("STOPPING=1"))
    });
    assert!(got.iter().any(|m| m.contains("STOPPING=1")), "{got:?}");
    let done = tracer.wait().unwrap();
    assert!(done.status.success(), "{}", done.stderr);

    // A job stallmon starts does not inherit the channel (it could speak for stallmon).
    let env_file = dir.join("job.env");
    let script = format!("env > {}", env_file.display());
    let tracer = launch(
        "trace",
        &[
            "--no-gpu".into(),
            "--".into(),
            "sh".into(),
            "-c".into(),
            script,
        ],
        &[
            ("NOTIFY_SOCKET", path.as_os_str()),
            ("WATCHDOG_USEC", "1000000".as_ref()),
        ],
    );
    let done = tracer.wait().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
    let env = std::fs::read_to_string(&env_file).unwrap();
    assert!(env.contains("PATH="), "{env}");
    assert!(
        !env.contains("NOTIFY_SOCKET") && !env.contains("WATCHDOG_"),
        "{env}"
    );
}

/// A GPU driver that stops answering (every NVML call on GPU 0 takes 11 s) must not stop the
/// kernel figures, the endpoint or `/healthz`: after 10 s of silence the GPU is marked stale,
/// and it comes back when the driver does.
#[test]
fn a_hung_gpu_driver_does_not_stop_the_figures() {
    require_privileged();
    let gpus = StandinGpus::new("hung", 1, 100, 200);
    let dir = scratch_dir("hung");
    let started = dir.join("started");
    let _ = std::fs::remove_file(&started);
    let mut args = vec!["--interval".to_string(), "250ms".into()];
    args.extend(gpus.args());
    args.extend(gpu_job(&gpus, 0, 40.0, &started));
    let tracer = launch("trace", &args, &gpus.env());
    tracer
        .scrape_until(Duration::from_secs(10), |t| gpu0_stale(t).is_some())
        .unwrap();
    let busy = |t: &str| tests::metric_sum(t, "stallmon_task_state_seconds_total", &[]);
    gpus.set_delay(0, 11_000);
    let hung_at = Instant::now();
    let before = busy(&tracer.scrape().unwrap());
    let mut stale_after = None;
    let mut worst_scrape = Duration::ZERO;
    while hung_at.elapsed() < Duration::from_secs(25) {
        let t = Instant::now();
        let text = tracer.scrape().unwrap();
        worst_scrape = worst_scrape.max(t.elapsed());
        let (code, body) = tests::prom::http_get(tracer.addr, "/healthz").unwrap();
        assert_eq!(
            code,
            200,
            "healthz {:.1} s into the hang: {}",
            hung_at.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&body)
        );
        if gpu0_stale(&text) == Some(1.0) {
            stale_after = Some(hung_at.elapsed());
            // The kernel's figures went on meanwhile.
            let after = busy(&text);
            assert!(after > before + 5.0, "task seconds {before} -> {after}");
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let stale_after = stale_after.expect("GPU 0 never became stale");
    println!(
        "GPU stale {:.1} s into the hang; slowest scrape meanwhile {worst_scrape:?}",
        stale_after.as_secs_f64()
    );
    assert!(stale_after >= Duration::from_secs(9), "{stale_after:?}");
    assert!(worst_scrape < Duration::from_secs(1), "{worst_scrape:?}");
    // The driver answers again.
    gpus.set_delay(0, 0);
    let back = Instant::now();
    tracer
        .scrape_until(Duration::from_secs(20), |t| gpu0_stale(t) == Some(0.0))
        .unwrap();
    println!(
        "GPU fresh again {:.1} s after the driver recovered",
        back.elapsed().as_secs_f64()
    );
    // Stopping ends the job (its status is stallmon's) and prints the summary.
    let done = tracer.stop().unwrap();
    assert!(done.stderr.contains("stallmon summary"), "{}", done.stderr);
}

/// `--version` names the source revision, and `stallmon_build_info` carries the same.
#[test]
fn version_and_build_info_name_the_revision() {
    require_privileged();
    let out = Command::new(stallmon_bin())
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // "stallmon 0.1.0 (0123456789ab)"
    let (version, rest) = text
        .strip_prefix("stallmon ")
        .and_then(|t| t.split_once(" ("))
        .unwrap_or_else(|| panic!("{text}"));
    let revision = rest.trim_end_matches(')');
    assert_eq!(version, env!("CARGO_PKG_VERSION"), "{text}");
    let head = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short=12",
            "HEAD",
        ])
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    if !head.is_empty() {
        assert_eq!(revision, head, "{text}");
    }
    let sleeper = Reaper(Command::new("sleep").arg("30").spawn().unwrap());
    let tracer = launch(
        "trace",
        &["--pid".into(), sleeper.pid().to_string(), "--no-gpu".into()],
        &[],
    );
    let metrics = tracer.scrape().unwrap();
    let line = format!("stallmon_build_info{{version=\"{version}\",revision=\"{revision}\"");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(&line) && l.ends_with(" 1")),
        "{line} missing:\n{metrics}"
    );
    tracer.stop().unwrap();
}

/// `--gpus` takes dcgm-exporter's identity: a UUID picks that GPU and no other; a UUID no GPU
/// has is a clear error before the job runs.
#[test]
fn gpus_are_chosen_by_uuid() {
    require_privileged();
    let gpus = StandinGpus::new("by-uuid", 3, 100, 200);
    let dir = scratch_dir("by-uuid");
    let started = dir.join("started");
    let _ = std::fs::remove_file(&started);
    let mut args = vec![
        "--interval".to_string(),
        "250ms".into(),
        "--gpus".into(),
        StandinGpus::uuid(1).to_lowercase(),
    ];
    args.extend(gpus.args());
    args.extend(gpu_job(&gpus, 1, 3.0, &started));
    let tracer = launch("trace", &args, &gpus.env());
    let text = tracer
        .scrape_until(Duration::from_secs(10), |t| {
            tests::metric_sum(t, "stallmon_gpu_busy_seconds_total", &["gpu=\"1\""]) > 0.0
        })
        .unwrap();
    let info: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("stallmon_gpu_info{"))
        .collect();
    assert_eq!(info.len(), 1, "{info:?}");
    assert!(
        info[0].contains(&format!("UUID=\"{}\"", StandinGpus::uuid(1))),
        "{info:?}"
    );
    let done = tracer.wait().unwrap();
    assert!(done.status.success(), "{}", done.stderr);

    // A UUID nobody has: an error, and the job never starts.
    let _ = std::fs::remove_file(&started);
    let mut args = vec![
        "trace".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--gpus".into(),
        "GPU-00000000-dead-beef-0000-000000000000".into(),
    ];
    args.extend(gpus.args());
    args.extend(gpu_job(&gpus, 1, 3.0, &started));
    let out = Command::new(stallmon_bin())
        .args(&args)
        .envs(gpus.env())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--gpus") && err.contains("GPU-00000000-dead-beef"),
        "{err}"
    );
    // One line (the stand-in library's own notes aside).
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("stallmon NVML stand-in"))
        .collect();
    assert_eq!(ours.len(), 1, "{err}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!started.exists(), "the job ran");
}

/// Every setting from the environment (the DaemonSet and the systemd unit use them), logs as
/// JSON lines with timestamps, and a misspelt log level is an error, not a silent default.
#[test]
fn settings_from_the_environment_and_json_logs() {
    require_privileged();
    let sleeper = Reaper(Command::new("sleep").arg("30").spawn().unwrap());
    let pid = sleeper.pid().to_string();
    let tracer = launch(
        "trace",
        &[],
        &[
            ("STALLMON_PID", pid.as_ref()),
            ("STALLMON_NO_GPU", "true".as_ref()),
            ("STALLMON_INTERVAL", "300ms".as_ref()),
            ("STALLMON_DURATION", "2s".as_ref()),
            ("STALLMON_JOB_NAME", "from-env".as_ref()),
            ("STALLMON_LOG_FORMAT", "json".as_ref()),
            ("STALLMON_JSON", "true".as_ref()),
        ],
    );
    assert_eq!(
        tracer.ready["target_pid"].as_u64(),
        Some(u64::from(sleeper.pid()))
    );
    let text = tracer.scrape().unwrap();
    assert!(text.contains("job_name=\"from-env\""), "{text}");
    let t0 = Instant::now();
    let done = tracer.wait().unwrap();
    let took = t0.elapsed();
    assert!(done.status.success(), "{}", done.stderr);
    assert!(
        took < Duration::from_secs(4),
        "STALLMON_DURATION ignored: {took:?}"
    );
    // The JSON summary on stdout (STALLMON_JSON).
    let summary = done.summary().unwrap();
    assert!(summary.is_object());
    // Every log line is a JSON object with a timestamp, a level and a message.
    let lines: Vec<&str> = done.stderr.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["timestamp"].is_string(), "{l}");
        assert!(v["level"].is_string(), "{l}");
        assert!(v["message"].is_string(), "{l}");
    }
    // A misspelt level: one line, exit 2.
    let out = Command::new(stallmon_bin())
        .args(["check", "--no-load"])
        .env("STALLMON_LOG_LEVEL", "debgu")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--log-level") && err.contains("debgu"),
        "{err}"
    );
}
