//! stallmon is root next to other users' jobs: what it writes, what it takes from a job and what
//! it serves must not be turned against the host, and nothing it collected may be lost to a full
//! disk, a kill or a reused PID (the defects of issue 11, each with the test that found it).
use std::{
    io::Write,
    net::TcpStream,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    Tracer, job, metric_sum, procs::Reaper, python, require_privileged, scratch_dir, stallmon_bin,
    workload,
};

fn fresh_dir(name: &str) -> PathBuf {
    let d = scratch_dir(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn trace(args: &[&str]) -> std::process::Output {
    Command::new(stallmon_bin())
        .args(["trace", "--listen", "127.0.0.1:0"])
        .args(args)
        .output()
        .unwrap()
}

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Item 1: A record path that is a symlink planted by a job's user is never followed; an existing
/// file is never truncated; records are mode 0600.
#[test]
fn record_file_is_never_a_weapon() {
    require_privileged();
    let d = fresh_dir("sec-record");
    let victim = d.join("passwd-like");
    std::fs::write(&victim, "root:x:0:0\n").unwrap();
    let link = d.join("run.jsonl");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    for extra in [&[][..], &["--record-append"][..]] {
        let mut args = vec!["--no-gpu", "--record", link.to_str().unwrap()];
        args.extend(extra);
        args.extend(["--", "true"]);
        let o = trace(&args);
        assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
        assert_eq!(stderr_of(&o).trim().lines().count(), 1, "{}", stderr_of(&o));
    }
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root:x:0:0\n");
    // An existing file is refused, not truncated.
    let o = trace(&[
        "--no-gpu",
        "--record",
        victim.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr_of(&o).contains("already exists"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root:x:0:0\n");
    // A new record is private.
    let rec = d.join("new.jsonl");
    let o = trace(&["--no-gpu", "--record", rec.to_str().unwrap(), "--", "true"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let mode = std::fs::metadata(&rec).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Appending to it works and keeps it a valid record.
    let o = trace(&[
        "--no-gpu",
        "--record",
        rec.to_str().unwrap(),
        "--record-append",
        "--",
        "true",
    ]);
    assert!(o.status.success(), "{}", stderr_of(&o));
}

/// Items 3 and 11: Record paths that cannot work are refused before anything starts (the command is
/// never run), FIFOs included (no hang).
#[test]
fn bad_record_paths_fail_before_the_job_starts() {
    require_privileged();
    let d = fresh_dir("sec-record-bad");
    let marker = d.join("job-ran");
    let job = format!("touch {}", marker.display());
    let fifo = d.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (path, append) in [
        (d.join("missing/run.jsonl"), false),
        (PathBuf::from("/dev/full"), true),
        (fifo.clone(), true),
        (fifo, false),
    ] {
        let t0 = Instant::now();
        let mut args = vec!["--no-gpu", "--record", path.to_str().unwrap()];
        if append {
            args.push("--record-append");
        }
        args.extend(["--", "sh", "-c", &job]);
        let o = trace(&args);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}: {}",
            path.display(),
            stderr_of(&o)
        );
        assert!(stderr_of(&o).contains("record file"), "{}", stderr_of(&o));
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "hung on {}",
            path.display()
        );
        assert!(
            !marker.exists(),
            "the job ran although the record could not be written"
        );
    }
}

/// Item 3: A record that fails mid-run (full disk) is counted and said once; tracing, the endpoint,
/// the summary and the job's exit status all go on.
#[test]
fn a_full_disk_does_not_stop_tracing() {
    require_privileged();
    let d = fresh_dir("sec-full");
    let mnt = d.join("tiny");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32k", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(ok.success(), "mounting a tiny tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let rec = mnt.join("run.jsonl");
    let tracer = Tracer::start(&[
        "--no-gpu",
        "--interval",
        "0.1",
        "--record",
        rec.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "for i in $(seq 30); do cat /proc/self/status >/dev/null; sleep 0.1; done; exit 5",
    ])
    .unwrap();
    let text = tracer
        .scrape_until(Duration::from_secs(20), |t| {
            metric_sum(t, "stallmon_record_errors_total", &[]) > 0.0
        })
        .unwrap();
    assert!(text.contains("stallmon_task_state_seconds_total"));
    let done = tracer.wait().unwrap();
    assert_eq!(done.status.code(), Some(5), "{}", done.stderr);
    assert!(done.stderr.contains("stallmon summary"), "{}", done.stderr);
    assert_eq!(
        done.stderr.matches("writing the record file").count(),
        1,
        "said once: {}",
        done.stderr
    );
}

/// Lines of a record, up to the last complete one.
fn complete_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let ends_complete = text.ends_with('\n');
    let mut lines: Vec<&str> = text.lines().collect();
    if !ends_complete {
        lines.pop();
    }
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn report_of(input: &Path) -> Value {
    let o = Command::new(stallmon_bin())
        .args(["report", "--json"])
        .arg(input)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Items 4, 5 and the fault test: A tracer killed with SIGKILL at random moments leaves a record whose
/// every complete interval `report` uses; `report` reads pipes too.
#[test]
fn killed_tracer_records_are_reported_in_full() {
    require_privileged();
    let d = fresh_dir("sec-kill");
    let data = d.join("data");
    tests::loader_dataset(&data, 16, 256);
    let py = python();
    let mut seed = std::process::id() as u64 | 1;
    for round in 0..3 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let kill_after = Duration::from_millis(1500 + seed % 2500);
        let rec = d.join(format!("killed-{round}.jsonl"));
        let args = [
            "--no-gpu".to_string(),
            "--interval".into(),
            "0.3".into(),
            "--record".into(),
            rec.display().to_string(),
            "--".into(),
            py.display().to_string(),
            workload("loader.py").display().to_string(),
            "--data".into(),
            data.display().to_string(),
            "--files".into(),
            "16".into(),
            "--rounds".into(),
            "100".into(),
            "--drop-cache".into(),
            "--report".into(),
            d.join(format!("loader-{round}.json")).display().to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let tracer = Tracer::start(&args).unwrap();
        std::thread::sleep(kill_after);
        let job_pids = tests::procs::descendants(tracer.pid());
        // SAFETY: killing our own child, then its orphaned job.
        unsafe { libc::kill(tracer.pid() as i32, libc::SIGKILL) };
        let _ = tracer.wait();
        for p in job_pids {
            // SAFETY: the job this test started.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
        let lines = complete_lines(&rec);
        let intervals: Vec<&Value> = lines.iter().filter(|l| l["type"] == "interval").collect();
        assert!(
            intervals.len() >= 3,
            "round {round}: {} intervals",
            intervals.len()
        );
        let requests: u64 = intervals
            .iter()
            .flat_map(|i| i["block"].as_array().unwrap())
            .map(|b| b["requests"].as_u64().unwrap())
            .sum();
        let r = report_of(&rec);
        let reported: u64 = r["block"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["requests"].as_u64().unwrap())
            .sum();
        println!(
            "round {round}: killed after {kill_after:?}: {} complete intervals, {requests} block requests, report {reported}, {:.1} s",
            intervals.len(),
            r["duration_seconds"]
        );
        assert_eq!(reported, requests, "every complete interval is reported");
        assert!(r["duration_seconds"].as_f64().unwrap() > 0.5);
        assert!(
            job(&r)["roles"][1]["processes_seen"].as_u64().unwrap() >= 1,
            "{r}"
        );

        // The same through a pipe, and through /dev/stdin.
        for how in ["-", "/dev/stdin"] {
            let mut child = Command::new(stallmon_bin())
                .args(["report", "--json", how])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let text = std::fs::read(&rec).unwrap();
            let mut stdin = child.stdin.take().unwrap();
            std::thread::spawn(move || {
                let _ = stdin.write_all(&text);
            });
            let o = child.wait_with_output().unwrap();
            assert!(o.status.success(), "report {how}: {}", stderr_of(&o));
            let piped: Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(piped["block"], r["block"]);
        }
    }
}

/// Item 6: Two thousand local sockets that never finish their request do not keep a scraper out.
#[test]
fn half_open_connections_do_not_block_scrapes() {
    require_privileged();
    // This test's own process needs the descriptors.
    let lim = libc::rlimit {
        rlim_cur: 8192,
        rlim_max: 8192,
    };
    // SAFETY: valid pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    let sleeper = Reaper(Command::new("sleep").arg("120").spawn().unwrap());
    let pid = sleeper.pid().to_string();
    let tracer = Tracer::start(&["--pid", &pid, "--no-gpu"]).unwrap();
    let mut silent = Vec::new();
    for _ in 0..2000 {
        let s = TcpStream::connect(tracer.addr).unwrap();
        // Half a request line, never finished.
        let _ = (&s).write_all(b"GET /metr");
        silent.push(s);
    }
    let t0 = Instant::now();
    let text = tracer.scrape().unwrap();
    let took = t0.elapsed();
    println!("scrape with 2000 half-open sockets held: {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(text.contains("stallmon_build_info"));
    let (code, body) = tests::prom::http_get(tracer.addr, "/healthz").unwrap();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    drop(silent);
    let done = tracer.stop().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
}

/// Item 7: A job id with a newline (the job's user controls its environment) cannot forge log lines
/// or label values.
#[test]
fn hostile_job_environment_cannot_forge_logs_or_labels() {
    require_privileged();
    let tracer = Tracer::launch(
        "trace",
        &["--no-gpu", "--", "sh", "-c", "sleep 1.5"],
        &[
            (
                "SLURM_JOB_ID",
                std::ffi::OsStr::new("42\nstallmon: error: forged\u{1b}[2J"),
            ),
            (
                "TORCHELASTIC_RUN_ID",
                std::ffi::OsStr::new("run\r\nINFO fake line"),
            ),
        ],
    )
    .unwrap();
    let text = tracer.scrape().unwrap();
    let done = tracer.wait().unwrap();
    for line in done.stderr.lines() {
        assert!(!line.starts_with("stallmon: error: forged"), "{line}");
        assert!(!line.starts_with("INFO fake line"), "{line}");
        assert!(!line.contains('\u{1b}'), "{line:?}");
    }
    assert!(
        text.contains("hpc_job=\"42_stallmon: error: forged_[2J\""),
        "{text}"
    );
    assert!(text.contains("job_name=\"run__INFO fake line\""), "{text}");
}

/// Item 2: A dead worker's PID, reused by a new worker, is the new worker's: tracked while it runs,
/// its reads counted, the overwritten entry counted as a drop.
#[test]
fn a_reused_pid_is_tracked_as_the_new_process() {
    require_privileged();
    let d = fresh_dir("sec-pidreuse");
    let file = d.join("data.bin");
    let status = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "count=16", "status=none"])
        .arg(format!("of={}", file.display()))
        .status()
        .unwrap();
    assert!(status.success());
    let _ = std::fs::read(&file); // page cache
    let report = d.join("report.json");
    let py = python();
    let args = [
        "--no-gpu".to_string(),
        "--json".into(),
        // Long interval: the exited worker's entry is still there when its PID comes back.
        "--interval".into(),
        "3s".into(),
        "--".into(),
        py.display().to_string(),
        workload("pid_reuse.py").display().to_string(),
        "--file".into(),
        file.display().to_string(),
        "--report".into(),
        report.display().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let tracer = Tracer::start(&args).unwrap();
    let mut max_workers = 0.0f64;
    while !report.exists() && tests::procs::alive(tracer.pid()) {
        if let Ok(t) = tracer.scrape() {
            max_workers = max_workers.max(metric_sum(
                &t,
                "stallmon_tracked_processes",
                &["role=\"worker\""],
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let done = tracer.wait().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
    let own: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(
        own["reused"], true,
        "the kernel did not hand the PID back: {own}"
    );
    let s = done.summary().unwrap();
    let worker_bytes = job(&s)["task_io"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["role"] == "worker")
        .unwrap()["read_bytes"]
        .as_u64()
        .unwrap();
    println!(
        "PID {} reused: max tracked workers {max_workers}, worker bytes {worker_bytes}, drops {}",
        own["a"], s["dropped_events"]
    );
    assert!(
        max_workers >= 1.0,
        "the new worker was not tracked while it ran"
    );
    assert!(
        worker_bytes >= own["bytes"].as_u64().unwrap(),
        "the new worker's reads were lost: {worker_bytes}"
    );
}

/// Item 12: Memory per exited process is bounded: 5,000 short-lived processes later, stallmon's RSS
/// is where it was (within 4 MiB) and the summary lists a bounded number of processes.
#[test]
fn exited_processes_do_not_grow_memory() {
    require_privileged();
    let py = python();
    let args = [
        "--no-gpu".to_string(),
        "--json".into(),
        "--interval".into(),
        "0.2".into(),
        "--".into(),
        py.display().to_string(),
        workload("churn.py").display().to_string(),
        "--count".into(),
        "5000".into(),
        "--linger".into(),
        "4".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let tracer = Tracer::start(&args).unwrap();
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    std::thread::sleep(Duration::from_millis(400));
    let before = rss(tracer.pid());
    let mut after = before;
    while tests::procs::alive(tracer.pid()) {
        after = after.max(rss(tracer.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    let done = tracer.wait().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
    let s = done.summary().unwrap();
    let j = job(&s);
    let listed = j["processes"].as_array().unwrap().len() as u64;
    let seen: u64 = j["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["processes_seen"].as_u64().unwrap())
        .sum();
    println!(
        "5000 exits: RSS {before} -> {after} kB, {listed} processes listed, {} omitted, {seen} seen, drops {}",
        j["processes_omitted"], s["dropped_events"]
    );
    assert!(after < before + 4096, "RSS grew {before} -> {after} kB");
    assert!(listed <= 1001, "{listed}");
    assert!(seen >= 4900, "processes seen {seen}");
}
