//! `stallmon node`: every job on the host, found by its GPU contexts (the stand-in NVML library)
//! or its command line, labelled with its own identity, forgotten after it ends; and a churn of
//! 200 jobs that leaves memory and the kernel tables where they were.
//!
//! Privileged: these tests fail, never skip, when they cannot run.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tests::{
    Tracer, gpu::StandinGpus, metric_sum, metric_value, procs::Reaper, python, require_privileged,
    scratch_dir, workload,
};

/// Starts a job of its own (a new session) holding a context on `gpu`, with `env` set.
fn start_job(
    gpus: &StandinGpus,
    gpu: u32,
    seconds: f64,
    started: &Path,
    env: &[(&str, &str)],
) -> Child {
    let _ = std::fs::remove_file(started);
    let mut c = Command::new(python());
    c.arg(workload("gpu_job.py"))
        .arg("--gpu-dir")
        .arg(gpus.path())
        .args([
            "--gpu-index",
            &gpu.to_string(),
            "--seconds",
            &seconds.to_string(),
            "--setsid",
        ])
        .arg("--started")
        .arg(started)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

/// The monotonic time the job took its context.
fn context_at(started: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(t) = std::fs::read_to_string(started)
            && let Ok(ns) = t.trim().parse()
        {
            return ns;
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            started.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn node(gpus: &StandinGpus, extra: &[&str]) -> Tracer {
    let mut args: Vec<String> = Vec::new();
    if !extra.contains(&"--interval") {
        args.extend(["--interval".into(), "200ms".into()]);
    }
    args.extend(gpus.args());
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Tracer::launch("node", &refs, &gpus.env()).unwrap()
}

/// Waits until the exposition has a series for `selector` (returns when, monotonic ns).
fn seen(tracer: &Tracer, name: &str, labels: &[&str], timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let text = tracer.scrape().unwrap();
        if text.lines().any(|l| {
            !l.starts_with('#') && l.starts_with(name) && labels.iter().all(|lab| l.contains(lab))
        }) {
            return tests::procs::monotonic_ns();
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} did not appear within {timeout:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn node_finds_labels_and_forgets_jobs() {
    require_privileged();
    let gpus = StandinGpus::new("node", 3, 100, 200);
    let dir = scratch_dir("node");
    let tracer = node(&gpus, &["--forget-after", "3s"]);
    assert_eq!(tracer.ready["mode"], "node");
    // Two jobs, started apart from stallmon, with different identities.
    let (sa, sb, sc) = (
        dir.join("a.started"),
        dir.join("b.started"),
        dir.join("c.started"),
    );
    let a = Reaper(start_job(
        &gpus,
        0,
        6.0,
        &sa,
        &[("TORCHELASTIC_RUN_ID", "alpha")],
    ));
    let b = Reaper(start_job(&gpus, 1, 6.0, &sb, &[("SLURM_JOB_ID", "4242")]));
    let (ta, tb) = (context_at(&sa), context_at(&sb));
    let fa = seen(
        &tracer,
        "stallmon_gpu_busy_seconds_total",
        &["gpu=\"0\"", "job_name=\"alpha\"", "rank=\"0\""],
        Duration::from_secs(10),
    );
    let fb = seen(
        &tracer,
        "stallmon_gpu_busy_seconds_total",
        &["gpu=\"1\"", "hpc_job=\"4242\""],
        Duration::from_secs(10),
    );
    let (da, db) = ((fa - ta) as f64 * 1e-9, (fb - tb) as f64 * 1e-9);
    println!("found job alpha {da:.2} s and job 4242 {db:.2} s after their contexts appeared");
    // Found and attributed within 2 s (a GPU poll, the job's tree, the first samples).
    assert!(da < 2.0 && db < 2.0, "{da} {db}");
    // A third job, later.
    std::thread::sleep(Duration::from_secs(1));
    let c = Reaper(start_job(
        &gpus,
        2,
        3.0,
        &sc,
        &[("TORCHELASTIC_RUN_ID", "gamma")],
    ));
    let tc = context_at(&sc);
    let fc = seen(
        &tracer,
        "stallmon_target_up",
        &["job_name=\"gamma\""],
        Duration::from_secs(10),
    );
    println!(
        "found job gamma {:.2} s after its context",
        (fc - tc) as f64 * 1e-9
    );
    assert!((fc - tc) as f64 * 1e-9 < 2.0);
    let text = tracer.scrape().unwrap();
    assert_eq!(metric_value(&text, "stallmon_jobs"), Some(3.0), "{text}");
    // Each GPU's info series, with dcgm-exporter's labels.
    for i in 0..3 {
        assert!(
            text.contains(&format!("UUID=\"{}\"", StandinGpus::uuid(i))),
            "{text}"
        );
    }
    // The jobs end; their series stay for --forget-after, then go.
    drop((a, b, c));
    let t_end = Instant::now();
    let text = tracer.scrape().unwrap();
    assert!(text.contains("job_name=\"alpha\""));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = tracer.scrape().unwrap();
        if !text.contains("job_name=\"alpha\"")
            && !text.contains("hpc_job=\"4242\"")
            && !text.contains("job_name=\"gamma\"")
        {
            println!(
                "ended jobs forgotten {:.1} s after they ended",
                t_end.elapsed().as_secs_f64()
            );
            assert!(t_end.elapsed() >= Duration::from_secs(3));
            assert_eq!(metric_value(&text, "stallmon_jobs"), Some(0.0));
            assert_eq!(
                metric_value(&text, "stallmon_rank_slots{state=\"used\"}"),
                Some(0.0)
            );
            break;
        }
        assert!(Instant::now() < deadline, "jobs not forgotten:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let done = tracer.stop().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
}

/// `--match` finds jobs that hold no GPU (hosts without NVML).
#[test]
fn node_match_finds_jobs_without_gpus() {
    require_privileged();
    let marker = format!("stallmon-match-{}", std::process::id());
    let mut args: Vec<String> = vec!["--interval".into(), "200ms".into(), "--no-gpu".into()];
    args.extend(["--match".into(), format!("sleep.*{marker}")]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let tracer = Tracer::launch("node", &refs, &[]).unwrap();
    let job = Reaper(
        Command::new("bash")
            .args(["-c", &format!("exec -a 'sleep {marker}' sleep 30")])
            .spawn()
            .unwrap(),
    );
    seen(
        &tracer,
        "stallmon_tracked_processes",
        &["role=\"feeder\""],
        Duration::from_secs(10),
    );
    let text = tracer.scrape().unwrap();
    assert!(metric_sum(&text, "stallmon_tracked_processes", &["role=\"feeder\""]) >= 1.0);
    drop(job);
    let done = tracer.stop().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
}

/// A GPU holder that has exited but whose context the driver still lists (a zombie, here) is
/// not a new job; a live holder beside it is found.
#[test]
fn an_exiting_gpu_holder_is_not_a_new_job() {
    require_privileged();
    let gpus = StandinGpus::new("zombie", 1, 100, 200);
    gpus.keep_zombie_contexts();
    let dir = scratch_dir("zombie");
    // Takes a context on GPU 0 and exits; not reaped until the end of the test.
    let code = format!(
        "import sys; sys.path.insert(0, {:?}); from standin_gpu import StandinGpu; \
         StandinGpu({:?}, 0).open_context()",
        workload("standin_gpu.py").parent().unwrap(),
        gpus.path()
    );
    let mut zombie = Command::new(python()).args(["-c", &code]).spawn().unwrap();
    let zpid = zombie.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(format!("/proc/{zpid}/stat"))
        .unwrap_or_default()
        .rsplit(')')
        .next()
        .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    {
        assert!(Instant::now() < deadline, "{zpid} did not become a zombie");
        std::thread::sleep(Duration::from_millis(20));
    }
    let tracer = node(&gpus, &[]);
    let started = dir.join("live.started");
    let live = Reaper(start_job(
        &gpus,
        0,
        4.0,
        &started,
        &[("TORCHELASTIC_RUN_ID", "live-holder")],
    ));
    seen(
        &tracer,
        "stallmon_target_up",
        &["job_name=\"live-holder\""],
        Duration::from_secs(10),
    );
    // Two more NVML polls (1 s each) with the zombie listed beside the live holder.
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        let text = tracer.scrape().unwrap();
        let jobs = metric_value(&text, "stallmon_jobs").unwrap_or(-1.0);
        assert_eq!(jobs, 1.0, "the zombie {zpid} became a job:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(live);
    let done = tracer.stop().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
    assert!(
        !done.stderr.contains(&format!("pid={zpid}")),
        "{}",
        done.stderr
    );
    let _ = zombie.wait();
}

/// 200 jobs started and ended in a row: the kernel tables and stallmon's memory come back to
/// where they were.
#[test]
fn two_hundred_jobs_leave_nothing_behind() {
    require_privileged();
    let gpus = StandinGpus::new("churn", 4, 100, 200);
    let dir = scratch_dir("churn");
    let tracer = node(&gpus, &["--forget-after", "1s", "--interval", "100ms"]);
    let pid = tracer.pid();
    let occupancy = |t: &str| {
        (
            metric_value(t, "stallmon_jobs").unwrap_or(-1.0),
            metric_value(t, "stallmon_rank_slots{state=\"used\"}").unwrap_or(-1.0),
            metric_value(t, "stallmon_kernel_processes").unwrap_or(-1.0),
        )
    };
    // Warm up with a few jobs, then take the baseline.
    let run_jobs = |n: usize, base: usize| -> usize {
        let mut found = 0;
        let mut running: Vec<(Reaper, PathBuf)> = Vec::new();
        for i in 0..n {
            let started = dir.join(format!("job-{}.started", base + i));
            let env = [("TORCHELASTIC_RUN_ID", format!("churn-{}", base + i))];
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let gpu = (i % 4) as u32;
            running.push((Reaper(start_job(&gpus, gpu, 0.6, &started, &env)), started));
            if running.len() >= 8 {
                let (child, _) = running.remove(0);
                let mut c = child;
                let _ = c.0.wait();
                found += 1;
            }
        }
        for (mut c, _) in running {
            let _ = c.0.wait();
            found += 1;
        }
        found
    };
    let settle = |tracer: &Tracer| -> (f64, f64, f64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = tracer.scrape().unwrap();
            let o = occupancy(&text);
            if o == (0.0, 0.0, 0.0) || Instant::now() > deadline {
                return o;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    run_jobs(10, 0);
    assert_eq!(settle(&tracer), (0.0, 0.0, 0.0), "after the warm-up");
    let rss0 = rss_kb(pid);
    let t0 = Instant::now();
    // Count the jobs stallmon saw while they ran.
    let max_jobs = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen_jobs = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = tracer.addr;
    let watcher = {
        let (max_jobs, seen_jobs, stop) = (max_jobs.clone(), seen_jobs.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((_, body)) = tests::prom::http_get(addr, "/metrics") {
                    let text = String::from_utf8_lossy(&body);
                    if let Some(n) = metric_value(&text, "stallmon_jobs") {
                        max_jobs.fetch_max(n as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    let mut s = seen_jobs.lock().unwrap();
                    for l in text
                        .lines()
                        .filter(|l| l.starts_with("stallmon_target_up{"))
                    {
                        if let Some(n) = l
                            .split("job_name=\"churn-")
                            .nth(1)
                            .and_then(|r| r.split('"').next())
                        {
                            s.insert(n.to_string());
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    run_jobs(200, 100);
    let ran = t0.elapsed();
    let after = settle(&tracer);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.join().unwrap();
    let rss1 = rss_kb(pid);
    let found = seen_jobs.lock().unwrap().len();
    println!(
        "200 jobs in {:.1} s: {found} seen by stallmon, at most {} at once; afterwards jobs/slots/kernel processes {after:?}; RSS {rss0} -> {rss1} kB",
        ran.as_secs_f64(),
        max_jobs.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_eq!(after, (0.0, 0.0, 0.0), "tables not back to empty");
    assert!(rss1 < rss0 + 2048, "RSS grew {rss0} -> {rss1} kB");
    assert!(found >= 180, "only {found} of 200 jobs were seen");
    let done = tracer.stop().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
}

/// On a Kubernetes node the kubelet's pod-resources API names the pod, namespace and container
/// that hold each GPU: a job on that GPU carries them (dcgm-exporter's labels), including a pod
/// scheduled after stallmon started (asked again as soon as an unplaced GPU holder appears,
/// not at the next 30 s refresh).
#[test]
fn node_labels_jobs_with_their_kubelet_pods() {
    use tests::podresources_standin::{Behaviour, Standin, gpu_pod};
    require_privileged();
    let gpus = StandinGpus::new("node-pods", 2, 100, 200);
    let dir = scratch_dir("node-pods");
    let kubelet = Standin::start(Behaviour::Serve(vec![gpu_pod(
        "ml",
        "train-0",
        "trainer",
        &[&StandinGpus::uuid(0)],
    )]))
    .unwrap();
    let socket = kubelet.socket().to_str().unwrap().to_string();
    let mut tracer = node(&gpus, &["--pod-resources-socket", &socket]);
    let (sa, sb) = (dir.join("a.started"), dir.join("b.started"));
    let _a = Reaper(start_job(&gpus, 0, 8.0, &sa, &[]));
    context_at(&sa);
    seen(
        &tracer,
        "stallmon_gpu_busy_seconds_total",
        &[
            "gpu=\"0\"",
            "pod=\"train-0\"",
            "namespace=\"ml\"",
            "container=\"trainer\"",
        ],
        Duration::from_secs(10),
    );
    // A second pod is scheduled onto GPU 1 while stallmon runs.
    kubelet.set_pods(vec![
        gpu_pod("ml", "train-0", "trainer", &[&StandinGpus::uuid(0)]),
        gpu_pod("team-b", "notebook-b", "jupyter", &[&StandinGpus::uuid(1)]),
    ]);
    let _b = Reaper(start_job(&gpus, 1, 8.0, &sb, &[]));
    let tb = context_at(&sb);
    let want = "pod=\"notebook-b\",namespace=\"team-b\",container=\"jupyter\"";
    let found = tracer.scrape_until(Duration::from_secs(10), |t| {
        t.lines()
            .any(|l| l.starts_with("stallmon_gpu_busy_seconds_total{gpu=\"1\"") && l.contains(want))
    });
    let fb = tests::procs::monotonic_ns();
    if let Err(e) = found {
        panic!("{e}\nstallmon's log:\n{}", tracer.log());
    }
    let took = (fb - tb) as f64 * 1e-9;
    println!("the new pod's job was labelled {took:.2} s after its context appeared");
    assert!(took < 3.0, "{took}");
    // Each job keeps its own pod.
    let text = tracer.scrape().unwrap();
    for l in text
        .lines()
        .filter(|l| l.starts_with("stallmon_gpu_busy_seconds_total{"))
    {
        let want = if l.contains("gpu=\"0\"") {
            "pod=\"train-0\""
        } else {
            "pod=\"notebook-b\""
        };
        assert!(l.contains(want), "{l}");
    }
    // The kubelet was asked a handful of times, not once per tick.
    let calls = kubelet.calls();
    assert!((1..=10).contains(&calls), "{calls} pod-resources calls");
    let done = tracer.stop().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
}
