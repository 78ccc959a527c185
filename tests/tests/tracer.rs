//! Privileged end-to-end tests of the kernel tracer: ground truth from the kernel's own block
//! statistics and from the workloads' own measurements, the process tree, thread states,
//! Prometheus, and every bad input. They fail (never skip) where they cannot run.
use std::{
    collections::HashSet,
    net::TcpListener,
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    SlowDisk, Tracer, disk_name_of, drop_caches, metric_sum, prom, python, require_privileged,
    scratch_dir, stallmon_bin, workload,
};

/// Kills a child process when dropped (workloads must never outlive a failed test).
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_file(path: &Path, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str(&text)
        {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} did not appear within {timeout:?}", path.display());
}

/// Reads completed and sectors read of a whole disk, from /sys/block/<dev>/stat.
fn disk_reads(dev: &str) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/sys/block/{dev}/stat")).unwrap();
    let f: Vec<u64> = stat
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    (f[0], f[2])
}

fn block_entry<'a>(summary: &'a Value, dev: &str, op: &str) -> &'a Value {
    summary["block"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["device"] == dev && b["op"] == op)
        .unwrap_or_else(|| panic!("no block entry for {dev} {op}: {summary}"))
}

fn read_entry<'a>(summary: &'a Value, role: &str, kind: &str) -> &'a Value {
    summary["reads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["role"] == role && r["fd_kind"] == kind)
        .unwrap()
}

fn role_states(summary: &Value, role: &str) -> (f64, f64, f64, f64) {
    let r = summary["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["role"] == role)
        .unwrap();
    let s = &r["state_seconds"];
    let g = |k: &str| s[k].as_f64().unwrap();
    (
        g("on_cpu"),
        g("storage_wait"),
        g("ipc_wait"),
        g("other_wait"),
    )
}

/// Block layer vs /sys/block/<dev>/stat, and read-syscall histogram vs the workload's own
/// timing, for at least 5,000 O_DIRECT 4 KiB reads.
#[test]
fn odirect_reads_agree_with_kernel_stat_and_workload_timing() {
    require_privileged();
    let dir = scratch_dir("odirect");
    let file = dir.join("data.bin");
    let report = dir.join("report.json");
    let _ = std::fs::remove_file(&report);
    let py = python();
    let script = workload("odirect_reads.py");
    let status = Command::new(&py)
        .arg(&script)
        .args([
            "--create",
            "--size-mib",
            "64",
            "--report",
            "/dev/null",
            "--file",
        ])
        .arg(&file)
        .status()
        .unwrap();
    assert!(status.success());
    let dev = disk_name_of(&file).unwrap();

    let wl = Reaper(
        Command::new(&py)
            .arg(&script)
            .args([
                "--count", "6000", "--delay", "4", "--linger", "60", "--file",
            ])
            .arg(&file)
            .arg("--report")
            .arg(&report)
            .spawn()
            .unwrap(),
    );
    let pid = wl.0.id().to_string();
    let tracer =
        Tracer::start(&["--pid", &pid, "--json", "--no-gpu", "--interval", "0.1"]).unwrap();
    // Same window on both sides: read the kernel's counters, then scrape once the tracer has taken
    // its next snapshot (interval 0.1 s), at the start and at the end of the workload's reads.
    let traced = |text: &str| {
        let sel = [format!("device=\"{dev}\""), "op=\"read\"".to_string()];
        let sel: Vec<&str> = sel.iter().map(String::as_str).collect();
        (
            metric_sum(text, "stallmon_block_io_requests_total", &sel) as u64,
            metric_sum(text, "stallmon_block_io_bytes_total", &sel) as u64,
        )
    };
    let (reads0, sectors0) = disk_reads(&dev);
    std::thread::sleep(Duration::from_millis(250));
    let (treads0, tbytes0) = traced(&tracer.scrape().unwrap());
    let own = wait_for_file(&report, Duration::from_secs(120));
    let (reads1, sectors1) = disk_reads(&dev);
    std::thread::sleep(Duration::from_millis(250));
    let (treads1, tbytes1) = traced(&tracer.scrape().unwrap());
    let done = tracer.stop().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
    let summary = done.summary().unwrap();

    let stat_reads = reads1 - reads0;
    let stat_bytes = (sectors1 - sectors0) * 512;
    let traced_reads = treads1 - treads0;
    let traced_bytes = tbytes1 - tbytes0;
    let count_err = (traced_reads as f64 - stat_reads as f64).abs() / stat_reads as f64;
    let bytes_err = (traced_bytes as f64 - stat_bytes as f64).abs() / stat_bytes as f64;
    println!(
        "ground truth on {dev}: /sys/block stat {stat_reads} reads {stat_bytes} B; tracer {traced_reads} reads {traced_bytes} B; error {:.3}% / {:.3}%",
        count_err * 100.0,
        bytes_err * 100.0
    );
    assert!(
        stat_reads >= 5000,
        "workload reached the disk only {stat_reads} times"
    );
    assert!(
        count_err <= 0.02,
        "read count off by {:.2}%",
        count_err * 100.0
    );
    assert!(
        bytes_err <= 0.02,
        "read bytes off by {:.2}%",
        bytes_err * 100.0
    );
    let b = block_entry(&summary, &dev, "read");
    let traced_reads = b["requests"].as_u64().unwrap();
    // The job's own requests are attributed to its role (the feeder submitted them).
    let job_reqs = b["job_requests"][0].as_u64().unwrap();
    assert!(
        job_reqs >= 6000 * 98 / 100,
        "feeder-submitted requests {job_reqs}"
    );
    // Every traced read has a latency (issued after attach), and queue time is tracked.
    assert!(b["latency"]["count"].as_u64().unwrap() + 5 >= traced_reads);

    // The workload's own mean read latency lies inside the tracer's histogram mass.
    let r = read_entry(&summary, "feeder", "file");
    assert!(r["count"].as_u64().unwrap() >= 6000);
    assert_eq!(r["bytes"].as_u64().unwrap(), own["bytes"].as_u64().unwrap());
    let hist: Vec<u64> = r["latency"]["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let total: u64 = hist.iter().sum();
    let (mut lo, mut hi, mut seen) = (None, 0, 0u64);
    for (i, c) in hist.iter().enumerate() {
        seen += c;
        if lo.is_none() && seen as f64 > 0.01 * total as f64 {
            lo = Some(i);
        }
        if *c > 0 && (seen - c) as f64 <= 0.99 * total as f64 {
            hi = i;
        }
    }
    let lo = lo.unwrap();
    let lower = if lo == 0 {
        0.0
    } else {
        (1u64 << (lo - 1)) as f64 * 1e-6
    };
    let upper = (1u64 << hi) as f64 * 1e-6;
    let own_mean = own["mean_s"].as_f64().unwrap();
    let traced_mean = r["latency"]["mean_seconds"].as_f64().unwrap();
    println!(
        "read latency: workload mean {:.1} us, tracer mean {:.1} us, tracer 98% mass in [{:.0}, {:.0}] us",
        own_mean * 1e6,
        traced_mean * 1e6,
        lower * 1e6,
        upper * 1e6
    );
    assert!(
        (lower..=upper).contains(&own_mean),
        "workload mean {own_mean} outside the tracer's mass [{lower}, {upper}]"
    );
    let ratio = traced_mean / own_mean;
    assert!(
        (0.7..=1.1).contains(&ratio),
        "tracer/workload mean ratio {ratio}"
    );
}

fn live_descendants(root: u32) -> HashSet<u32> {
    let mut parent = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some((_, rest)) = stat.rsplit_once(") ")
            && !rest.starts_with('Z')
            && let Some(pp) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok())
        {
            parent.insert(pid, pp);
        }
    }
    parent
        .keys()
        .copied()
        .filter(|&p| {
            let mut cur = p;
            for _ in 0..64 {
                match parent.get(&cur) {
                    Some(&pp) if pp == root => return true,
                    Some(&pp) if pp > 1 => cur = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

/// Workers started the way PyTorch's DataLoader starts them are all tracked, exited ones are
/// removed, and per-role counts are right.
fn process_tree(start_method: &str) {
    require_privileged();
    let dir = scratch_dir(&format!("tree-{start_method}"));
    let data = dir.join("data");
    let report = dir.join("report.json");
    let _ = std::fs::remove_file(&report);
    let py = python();
    let script = workload("loader.py");
    tests::loader_dataset(&data, 32, 64);
    let (py_s, script_s, data_s, report_s) = (
        py.to_str().unwrap(),
        script.to_str().unwrap(),
        data.to_str().unwrap(),
        report.to_str().unwrap(),
    );
    let tracer = Tracer::start(&[
        "--json",
        "--no-gpu",
        "--interval",
        "0.2",
        "--",
        py_s,
        script_s,
        "--data",
        data_s,
        "--files",
        "32",
        "--workers",
        "4",
        "--rounds",
        "3",
        "--cpu-ms",
        "20",
        "--start-method",
        start_method,
        "--hold",
        "3",
        "--report",
        report_s,
    ])
    .unwrap();
    // While the workers run, every one of them is tracked.
    let mut max_workers = 0.0f64;
    while !report.exists() {
        if let Ok(text) = tracer.scrape() {
            max_workers = max_workers.max(metric_sum(
                &text,
                "stallmon_tracked_processes",
                &["role=\"worker\""],
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let own = wait_for_file(&report, Duration::from_secs(5));
    let feeder = own["pid"].as_u64().unwrap() as u32;
    // Workers have been joined: exited ones must be gone from the gauge.
    std::thread::sleep(Duration::from_millis(1000));
    let live = live_descendants(feeder);
    let text = tracer.scrape().unwrap();
    let tracked_now = metric_sum(&text, "stallmon_tracked_processes", &["role=\"worker\""]);
    let feeders = metric_sum(&text, "stallmon_tracked_processes", &["role=\"feeder\""]);
    let done = tracer.wait().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
    let summary = done.summary().unwrap();

    let workers: Vec<u32> = own["worker_pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect();
    println!(
        "{start_method}: workers {workers:?}, max tracked workers {max_workers}, after join {tracked_now} tracked vs {} live descendants",
        live.len()
    );
    assert!(
        max_workers >= 4.0,
        "only {max_workers} workers tracked at once"
    );
    assert_eq!(
        tracked_now as usize,
        live.len(),
        "exited workers still tracked"
    );
    assert_eq!(feeders, 1.0);
    let procs = summary["processes"].as_array().unwrap();
    for w in &workers {
        let p = procs
            .iter()
            .find(|p| p["pid"] == *w)
            .unwrap_or_else(|| panic!("worker {w} not tracked: {procs:?}"));
        assert_eq!(p["role"], "worker");
        assert_eq!(p["exited"], true);
        assert!(
            p["read_bytes"][0].as_u64().unwrap() > 0,
            "worker {w} read no file bytes"
        );
        if start_method == "spawn" {
            // spawn = fork + exec of a fresh interpreter (forkserver workers are forked from a
            // server that exec'd once, so they exec nothing themselves).
            assert!(
                p["execs"].as_u64().unwrap() >= 1,
                "spawn worker {w} did not exec"
            );
        }
    }
    let feeders: Vec<&Value> = procs.iter().filter(|p| p["role"] == "feeder").collect();
    assert_eq!(feeders.len(), 1);
    assert_eq!(feeders[0]["pid"], feeder);
    let file_bytes = read_entry(&summary, "worker", "file")["bytes"]
        .as_u64()
        .unwrap();
    assert!(
        file_bytes >= own["bytes"].as_u64().unwrap(),
        "worker file bytes {file_bytes}"
    );
    // The batches came through a pipe: the feeder's pipe reads are ipc, not file.
    assert!(
        read_entry(&summary, "feeder", "ipc")["count"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[test]
fn dataloader_fork_workers_are_tracked() {
    process_tree("fork");
}

#[test]
fn dataloader_spawn_workers_are_tracked() {
    process_tree("spawn");
}

#[test]
fn dataloader_forkserver_workers_are_tracked() {
    process_tree("forkserver");
}

fn run_loader(dir: &Path, slow: Option<&SlowDisk>, drop_cache: bool, rounds: u32) -> Value {
    let data = dir.join("data");
    let report = dir.join("report.json");
    let _ = std::fs::remove_file(&report);
    let py = python();
    let script = workload("loader.py");
    let mut argv = vec![
        py.to_string_lossy().into_owned(),
        script.to_string_lossy().into_owned(),
        "--data".into(),
        data.to_string_lossy().into_owned(),
        "--files".into(),
        "24".into(),
        "--kib".into(),
        "256".into(),
        "--workers".into(),
        "3".into(),
        "--rounds".into(),
        rounds.to_string(),
        "--cpu-ms".into(),
        if rounds > 1 { "2" } else { "0" }.into(),
        "--report".into(),
        report.to_string_lossy().into_owned(),
    ];
    if drop_cache {
        argv.push("--drop-cache".into());
    }
    let argv = match slow {
        Some(s) => s.wrap(&argv),
        None => argv,
    };
    let mut args = vec!["--json", "--no-gpu", "--"];
    args.extend(argv.iter().map(String::as_str));
    let done = Tracer::start(&args).unwrap().wait().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
    done.summary().unwrap()
}

/// Workers reading through a throttled disk are mostly in storage_wait, the feeder waiting on
/// their pipe is in ipc_wait; from the page cache, storage_wait is near zero.
#[test]
fn thread_states_follow_the_bottleneck() {
    require_privileged();
    let dir = scratch_dir("states");
    let data = dir.join("data");
    tests::loader_dataset(&data, 24, 256);

    // 6 MiB through a 2 MiB/s disk: ~3 s of reading.
    drop_caches();
    let slow = SlowDisk::new("stallmon-test-states", &data, 2 * 1024 * 1024).unwrap();
    let throttled = run_loader(&dir, Some(&slow), true, 1);
    drop(slow);
    let (w_cpu, w_sto, w_ipc, w_oth) = role_states(&throttled, "worker");
    let (f_cpu, f_sto, f_ipc, f_oth) = role_states(&throttled, "feeder");
    let f_total = f_cpu + f_sto + f_ipc + f_oth;
    println!(
        "throttled: workers cpu {w_cpu:.2} storage {w_sto:.2} ipc {w_ipc:.2} other {w_oth:.2}; feeder cpu {f_cpu:.2} storage {f_sto:.2} ipc {f_ipc:.2} other {f_oth:.2}"
    );
    // Each worker also has multiprocessing's queue-feeder thread, idle in a futex wait
    // (ipc_wait) for the whole run; among the rest, reading dominates.
    assert!(
        w_sto > w_cpu.max(w_ipc).max(w_oth),
        "storage_wait is not the workers' largest state"
    );
    let busy = w_cpu + w_sto + w_oth;
    assert!(
        w_sto / busy > 0.8,
        "workers storage_wait share {}",
        w_sto / busy
    );
    assert!(
        f_ipc / f_total > 0.5,
        "feeder ipc_wait share {}",
        f_ipc / f_total
    );

    // Same job, data in the page cache.
    for e in std::fs::read_dir(&data).unwrap().flatten() {
        let _ = std::fs::read(e.path());
    }
    // Enough work (10 passes over the data, 2 ms of CPU per item) that a share means something.
    let cached = run_loader(&dir, None, false, 10);
    let (w_cpu, w_sto, w_ipc, w_oth) = role_states(&cached, "worker");
    let w_total = w_cpu + w_sto + w_ipc + w_oth;
    println!(
        "page cache: workers cpu {w_cpu:.3} storage {w_sto:.3} ipc {w_ipc:.3} other {w_oth:.3}"
    );
    assert!(
        w_sto / w_total < 0.05 && w_sto < 0.05,
        "workers storage_wait {w_sto:.3} s ({:.1}%) from page cache",
        100.0 * w_sto / w_total
    );

    // Pipe reads are ipc, file reads are file.
    for s in [&throttled, &cached] {
        assert!(read_entry(s, "feeder", "ipc")["count"].as_u64().unwrap() > 0);
        assert!(read_entry(s, "worker", "file")["bytes"].as_u64().unwrap() >= 24 * 256 * 1024);
    }
}

const METRICS: [&str; 8] = [
    "stallmon_block_io_latency_seconds_bucket",
    "stallmon_block_io_queue_seconds_bucket",
    "stallmon_block_io_bytes_total",
    "stallmon_read_latency_seconds_bucket",
    "stallmon_read_bytes_total",
    "stallmon_task_state_seconds_total",
    "stallmon_tracked_processes",
    "stallmon_dropped_events_total",
];

/// The exposition passes `promtool check metrics`, and a real Prometheus server scrapes it and
/// answers a query for each metric.
#[test]
fn prometheus_scrapes_every_metric() {
    require_privileged();
    let dir = scratch_dir("prom");
    let data = dir.join("data");
    tests::loader_dataset(&data, 16, 64);
    let report = dir.join("report.json");
    let py = python();
    let args = [
        "--no-gpu".to_string(),
        "--interval".into(),
        "0.5".into(),
        "--".into(),
        py.to_string_lossy().into_owned(),
        workload("loader.py").to_string_lossy().into_owned(),
        "--data".into(),
        data.to_string_lossy().into_owned(),
        "--files".into(),
        "16".into(),
        "--rounds".into(),
        "400".into(),
        "--drop-cache".into(),
        "--hold".into(),
        "60".into(),
        "--report".into(),
        report.to_string_lossy().into_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let tracer = Tracer::start(&args).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let text = tracer.scrape().unwrap();
    let mut check = Command::new(prom::promtool_binary().unwrap())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let server = prom::Prometheus::start(&tracer.addr.to_string()).unwrap();
    for m in METRICS {
        let v = server
            .wait_for_series(m, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{m}: {e:#}"));
        println!(
            "prometheus answered {m}: {} series",
            v.as_array().map_or(0, |a| a.len())
        );
    }
    // A real question: the job's worker read p99 over the last minute.
    let q = "histogram_quantile(0.99, sum by (le) (rate(stallmon_read_latency_seconds_bucket{role=\"worker\",fd_kind=\"file\"}[1m])))";
    let v = server.wait_for_series(q, Duration::from_secs(30)).unwrap();
    println!("worker file read p99: {v}");
    // Interrupted, stallmon stops the command it started and exits with its status (SIGTERM).
    let done = tracer.stop().unwrap();
    assert_eq!(done.status.code(), Some(143), "{}", done.stderr);
    assert!(
        done.stderr.contains("stopped (interrupted)"),
        "{}",
        done.stderr
    );
}

fn stallmon(args: &[&str]) -> std::process::Output {
    Command::new(stallmon_bin()).args(args).output().unwrap()
}

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `stallmon trace --listen 127.0.0.1:0 -- true` with `env` set and asserts a one-line
/// error containing `needle` and exit status 1.
fn expect_trace_error(env: (&str, &str), needle: &str) {
    let o = Command::new(stallmon_bin())
        .args(["trace", "--listen", "127.0.0.1:0", "--", "true"])
        .env(env.0, env.1)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr_of(&o);
    assert!(e.contains(needle), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

#[test]
fn unknown_pid_is_a_clear_error() {
    require_privileged();
    let o = stallmon(&["trace", "--listen", "127.0.0.1:0", "--pid", "4000000"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr_of(&o);
    assert!(e.contains("no such process: PID 4000000"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

#[test]
fn non_root_is_a_clear_error() {
    require_privileged();
    let o = Command::new(stallmon_bin())
        .args(["trace", "--listen", "127.0.0.1:0", "--pid", "1"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr_of(&o);
    assert!(e.contains("needs root or CAP_BPF+CAP_PERFMON"), "{e}");
}

#[test]
fn missing_btf_and_tracefs_are_clear_errors() {
    require_privileged();
    expect_trace_error(
        ("STALLMON_BTF_PATH", "/nonexistent/vmlinux"),
        "kernel BTF not found at /nonexistent/vmlinux",
    );
    expect_trace_error(
        ("STALLMON_TRACEFS", "/nonexistent/tracing"),
        "tracefs is not mounted at /nonexistent/tracing",
    );

    // `stallmon check` reports the same as FAIL lines and exits non-zero.
    let o = Command::new(stallmon_bin())
        .args(["check", "--no-load"])
        .env("STALLMON_TRACEFS", "/nonexistent/tracing")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("FAIL  tracefs"), "{out}");
}

#[test]
fn check_passes_on_this_machine() {
    require_privileged();
    let o = stallmon(&["check"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("PASS  load and attach"), "{out}");
    assert!(
        out.contains("WARN  NVML") || out.contains("PASS  NVML"),
        "{out}"
    );
}

#[test]
fn port_in_use_is_a_clear_error() {
    require_privileged();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let o = stallmon(&["trace", "--listen", &addr, "--", "true"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr_of(&o);
    assert!(
        e.contains(&format!("cannot listen on {addr}: address already in use")),
        "{e}"
    );
}

#[test]
fn command_that_cannot_start_is_a_clear_error() {
    require_privileged();
    let o = stallmon(&[
        "trace",
        "--listen",
        "127.0.0.1:0",
        "--",
        "/nonexistent/train.py",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr_of(&o);
    assert!(
        e.contains("cannot start command \"/nonexistent/train.py\""),
        "{e}"
    );
}

#[test]
fn command_exit_status_is_passed_through() {
    require_privileged();
    let o = stallmon(&[
        "trace",
        "--listen",
        "127.0.0.1:0",
        "--no-gpu",
        "--",
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr_of(&o));
    assert!(stderr_of(&o).contains("stallmon summary"));
}

#[test]
fn target_exiting_mid_run_ends_with_a_summary() {
    require_privileged();
    let sleeper = Reaper(Command::new("sleep").arg("2").spawn().unwrap());
    let pid = sleeper.0.id().to_string();
    let t0 = Instant::now();
    let done = Tracer::start(&["--pid", &pid, "--json", "--no-gpu"])
        .unwrap()
        .wait()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(15));
    assert!(done.status.success(), "{}", done.stderr);
    assert!(
        done.stderr.contains("stopped (target exited)"),
        "{}",
        done.stderr
    );
    let s = done.summary().unwrap();
    assert_eq!(s["target_pid"].as_u64().unwrap().to_string(), pid);
}

#[test]
fn sigterm_detaches_cleanly_and_flushes_the_record() {
    require_privileged();
    let sleeper = Reaper(Command::new("sleep").arg("100").spawn().unwrap());
    let pid = sleeper.0.id().to_string();
    let record = scratch_dir("record").join("trace.jsonl");
    let _ = std::fs::remove_file(&record);
    let tracer = Tracer::start(&[
        "--pid",
        &pid,
        "--no-gpu",
        "--interval",
        "0.3",
        "--record",
        record.to_str().unwrap(),
    ])
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.child.id() as i32, libc::SIGTERM) };
    let done = tracer.wait().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
    assert!(
        done.stderr.contains("stopped (terminated)"),
        "{}",
        done.stderr
    );
    let text = std::fs::read_to_string(&record).unwrap();
    let types: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(types.first().map(String::as_str), Some("header"));
    assert!(
        types.iter().filter(|t| *t == "interval").count() >= 2,
        "{types:?}"
    );
    assert_eq!(types.last().map(String::as_str), Some("summary"));
    // The target survives its tracer, and no program stays attached.
    assert!(Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn duration_stops_tracing() {
    require_privileged();
    let sleeper = Reaper(Command::new("sleep").arg("100").spawn().unwrap());
    let pid = sleeper.0.id().to_string();
    let t0 = Instant::now();
    let done = Tracer::start(&["--pid", &pid, "--no-gpu", "--duration", "1.5", "--json"])
        .unwrap()
        .wait()
        .unwrap();
    assert!(done.status.success());
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(done.stderr.contains("stopped (duration reached)"));
    assert!(
        done.summary().unwrap()["duration_seconds"]
            .as_f64()
            .unwrap()
            >= 1.5
    );
}
