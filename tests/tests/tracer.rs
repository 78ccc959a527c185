//! Privileged end-to-end tests of the kernel tracer, in both modes (the default, which classifies
//! waits at the context switch, and `--syscalls`): ground truth from the kernel's own block
//! statistics and from the workloads' own measurements, the process tree, thread states,
//! Prometheus. They fail (never skip) where they cannot run.
use std::{
    collections::HashSet,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    SlowDisk, Tracer, disk_name_of, drop_caches, job, metric_sum, metric_value, procs::Reaper,
    prom, python, require_privileged, scratch_dir, workload,
};

/// How stallmon classifies reads.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// No syscall tracepoint: read stalls at the context switch, per-task I/O accounting.
    Default,
    /// `--syscalls`: every read call with its latency and bytes.
    Syscalls,
}

impl Mode {
    fn args(self) -> &'static [&'static str] {
        match self {
            Mode::Default => &[],
            Mode::Syscalls => &["--syscalls"],
        }
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

/// `--syscalls`: the read calls of a role and fd kind.
fn read_entry<'a>(summary: &'a Value, role: &str, kind: &str) -> &'a Value {
    job(summary)["reads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["role"] == role && r["fd_kind"] == kind)
        .unwrap_or_else(|| panic!("no reads for {role} {kind}: {summary}"))
}

/// The read stalls of a role and fd kind.
fn stall_entry<'a>(summary: &'a Value, role: &str, kind: &str) -> &'a Value {
    job(summary)["stalls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["role"] == role && r["fd_kind"] == kind)
        .unwrap_or_else(|| panic!("no stalls for {role} {kind}: {summary}"))
}

fn task_io<'a>(summary: &'a Value, role: &str) -> &'a Value {
    job(summary)["task_io"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["role"] == role)
        .unwrap()
}

/// A role's (on_cpu, storage_wait, ipc_wait, other) seconds; other includes cpu_wait (runnable,
/// waiting for a CPU), which stallmon reports apart.
fn role_states(summary: &Value, role: &str) -> (f64, f64, f64, f64) {
    let r = job(summary)["roles"]
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
        g("other_wait") + g("cpu_wait"),
    )
}

/// Where the central 98% of a histogram's mass lies, in seconds: [lower, upper].
fn central_mass(hist: &Value) -> (f64, f64) {
    let hist: Vec<u64> = hist
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
    (lower, (1u64 << hi) as f64 * 1e-6)
}

/// Block layer vs /sys/block/<dev>/stat, and the reads (whole calls with --syscalls, the sleeps
/// inside them by default) vs the workload's own timing, for at least 5,000 O_DIRECT 4 KiB
/// reads.
fn odirect_reads(mode: Mode, extra: &[&str]) {
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
    let pid = wl.pid().to_string();
    let mut args = vec!["--pid", &pid, "--json", "--no-gpu", "--interval", "0.1"];
    args.extend(mode.args());
    args.extend(extra);
    let tracer = Tracer::start(&args).unwrap();
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
    let text = tracer.scrape().unwrap();
    let (treads1, tbytes1) = traced(&text);
    // The issue probe: attached for good with `--block-issue-time probe`; otherwise detached
    // once every device has completed requests timed by the block layer itself (vda here:
    // writeback throttling keeps block statistics, so its requests carry RQF_STATS).
    let attached = metric_value(&text, "stallmon_block_issue_probe_attached");
    let want = if extra.contains(&"probe") { 1.0 } else { 0.0 };
    assert_eq!(attached, Some(want), "{mode:?} {extra:?}");
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
        "{mode:?}: ground truth on {dev}: /sys/block stat {stat_reads} reads {stat_bytes} B; tracer {traced_reads} reads {traced_bytes} B; error {:.3}% / {:.3}%",
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
    assert!(b["queue"]["count"].as_u64().unwrap() > 0);
    if extra.contains(&"probe") {
        // Our own issue time, taken after the block layer's plug-cached start time: every
        // request shows some queue time.
        let q = b["queue"]["mean_seconds"].as_f64().unwrap();
        println!("probe issue time: queue mean {:.2} us", q * 1e6);
        assert!(q > 0.0);
    }

    // The workload's own mean read latency lies inside the tracer's histogram mass.
    let own_mean = own["mean_s"].as_f64().unwrap();
    let own_bytes = own["bytes"].as_u64().unwrap();
    let io = task_io(&summary, "feeder");
    assert!(io["read_syscalls"].as_u64().unwrap() >= 6000, "{io}");
    assert!(
        io["storage_read_bytes"].as_u64().unwrap() >= own_bytes * 98 / 100,
        "per-task storage bytes {io} vs {own_bytes}"
    );
    let (what, entry, lo_ratio) = match mode {
        Mode::Syscalls => {
            let r = read_entry(&summary, "feeder", "file");
            assert!(r["count"].as_u64().unwrap() >= 6000);
            assert_eq!(r["bytes"].as_u64().unwrap(), own_bytes);
            ("read calls", r, 0.7)
        }
        Mode::Default => {
            // Each O_DIRECT read sleeps until the disk answers: one stall per read (at least),
            // shorter than the whole call (which also submits and copies) and comparable to
            // the disk's own time (in a VM the sleep starts only after the doorbell's VM exit,
            // several microseconds after issue).
            let disk_mean = b["latency"]["mean_seconds"].as_f64().unwrap();
            let stall_mean = stall_entry(&summary, "feeder", "file")["latency"]["mean_seconds"]
                .as_f64()
                .unwrap();
            println!(
                "Default: disk read latency mean {:.1} us, read stall mean {:.1} us",
                disk_mean * 1e6,
                stall_mean * 1e6
            );
            assert!(
                (0.5 * disk_mean..=1.5 * disk_mean).contains(&stall_mean),
                "stall mean {stall_mean} vs the disk's {disk_mean}"
            );
            // Nearly one stall per read: a read whose I/O completes before the thread goes to
            // sleep has none (seen: 5,767 of 6,000 with the disk answering in 34 us).
            let s = stall_entry(&summary, "feeder", "file");
            assert!(
                s["latency"]["count"].as_u64().unwrap() >= 6000 * 90 / 100,
                "{s}"
            );
            assert!(job(&summary)["reads"].as_array().unwrap().is_empty());
            ("read stalls", s, 0.3)
        }
    };
    let (lower, upper) = central_mass(&entry["latency"]["histogram"]);
    let traced_mean = entry["latency"]["mean_seconds"].as_f64().unwrap();
    println!(
        "{mode:?}: workload read mean {:.1} us, tracer {what} mean {:.1} us, 98% mass in [{:.0}, {:.0}] us",
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
        (lo_ratio..=1.1).contains(&ratio),
        "tracer/workload mean ratio {ratio}"
    );
}

#[test]
fn odirect_reads_agree_with_kernel_stat_and_workload_timing() {
    odirect_reads(Mode::Default, &[]);
}

/// The block path's fallback: issue times from our own probe (devices without block stats).
#[test]
fn odirect_reads_agree_with_kernel_stat_and_workload_timing_probe_issue_time() {
    odirect_reads(Mode::Default, &["--block-issue-time", "probe"]);
}

#[test]
fn odirect_reads_agree_with_kernel_stat_and_workload_timing_syscalls() {
    odirect_reads(Mode::Syscalls, &[]);
}

/// The issue probe stays detached on a device the kernel stamps, through fsync traffic: an
/// empty flush, completed without ever being started, carries no stamp and once made the probe
/// flap (attached again at every other interval).
#[test]
fn the_issue_probe_stays_detached_through_fsyncs() {
    require_privileged();
    let dir = scratch_dir("issue-probe");
    let file = dir.join("fsync.bin");
    let job = Reaper(Command::new("sleep").arg("30").spawn().unwrap());
    let pid = job.pid().to_string();
    let tracer = Tracer::start(&["--no-gpu", "--interval", "200ms", "--pid", &pid]).unwrap();
    let write_and_sync = || {
        use std::io::Write;
        let mut f = std::fs::File::create(&file).unwrap();
        f.write_all(&[7u8; 256 << 10]).unwrap();
        f.sync_all().unwrap();
    };
    // Data requests first: the device is then known to be stamped.
    write_and_sync();
    std::thread::sleep(Duration::from_millis(1000));
    let mut seen = String::new();
    for _ in 0..25 {
        write_and_sync();
        std::thread::sleep(Duration::from_millis(100));
        let text = tracer.scrape().unwrap();
        let v = metric_value(&text, "stallmon_block_issue_probe_attached").unwrap();
        seen.push(if v == 0.0 { '0' } else { '1' });
    }
    let done = tracer.stop().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
    println!("issue probe attached, every 100 ms under fsyncs: {seen}");
    assert!(
        !seen.contains('1'),
        "the issue probe was attached again: {seen}"
    );
}

fn live_descendants(root: u32) -> HashSet<u32> {
    tests::procs::descendants(root)
        .into_iter()
        .filter(|&p| tests::procs::alive(p))
        .collect()
}

/// Workers started the way PyTorch's DataLoader starts them are all tracked, exited ones are
/// removed, and per-role counts are right.
fn process_tree(start_method: &str, mode: Mode) {
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
    let mut args = vec!["--json", "--no-gpu", "--interval", "0.2"];
    args.extend(mode.args());
    args.extend([
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
    ]);
    let tracer = Tracer::start(&args).unwrap();
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
        "{start_method} {mode:?}: workers {workers:?}, max tracked workers {max_workers}, after join {tracked_now} tracked vs {} live descendants",
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
    let procs = job(&summary)["processes"].as_array().unwrap();
    for w in &workers {
        let p = procs
            .iter()
            .find(|p| p["pid"] == *w)
            .unwrap_or_else(|| panic!("worker {w} not tracked: {procs:?}"));
        assert_eq!(p["role"], "worker");
        assert_eq!(p["exited"], true);
        let bytes = match mode {
            Mode::Syscalls => p["read_bytes"][0].as_u64().unwrap(),
            Mode::Default => p["task_read_bytes"].as_u64().unwrap(),
        };
        assert!(bytes > 0, "worker {w} read no file bytes");
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
    let ranks = job(&summary)["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 1, "{ranks:?}");
    assert_eq!(
        ranks[0]["feeders"].as_array().unwrap().last().unwrap()["pid"],
        feeder
    );
    let own_bytes = own["bytes"].as_u64().unwrap();
    match mode {
        Mode::Syscalls => {
            let file_bytes = read_entry(&summary, "worker", "file")["bytes"]
                .as_u64()
                .unwrap();
            assert!(file_bytes >= own_bytes, "worker file bytes {file_bytes}");
            // The batches came through a pipe: the feeder's pipe reads are ipc, not file.
            assert!(
                read_entry(&summary, "feeder", "ipc")["count"]
                    .as_u64()
                    .unwrap()
                    > 0
            );
        }
        Mode::Default => {
            let read = task_io(&summary, "worker")["read_bytes"].as_u64().unwrap();
            assert!(read >= own_bytes, "worker bytes read {read} < {own_bytes}");
            // The feeder sleeps reading the pipe the batches come through: ipc stalls.
            assert!(
                stall_entry(&summary, "feeder", "ipc")["latency"]["count"]
                    .as_u64()
                    .unwrap()
                    > 0
            );
        }
    }
}

#[test]
fn dataloader_fork_workers_are_tracked() {
    process_tree("fork", Mode::Default);
}

#[test]
fn dataloader_fork_workers_are_tracked_syscalls() {
    process_tree("fork", Mode::Syscalls);
}

#[test]
fn dataloader_spawn_workers_are_tracked() {
    process_tree("spawn", Mode::Default);
}

#[test]
fn dataloader_forkserver_workers_are_tracked() {
    process_tree("forkserver", Mode::Syscalls);
}

fn run_loader(
    dir: &Path,
    slow: Option<&SlowDisk>,
    drop_cache: bool,
    rounds: u32,
    mode: Mode,
) -> Value {
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
    let mut args = vec!["--json", "--no-gpu"];
    args.extend(mode.args());
    args.push("--");
    args.extend(argv.iter().map(String::as_str));
    let done = Tracer::start(&args).unwrap().wait().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
    done.summary().unwrap()
}

/// Workers reading through a throttled disk are mostly in storage_wait, the feeder waiting on
/// their pipe is in ipc_wait; from the page cache, storage_wait is near zero.
fn thread_states(mode: Mode) {
    require_privileged();
    let dir = scratch_dir("states");
    let data = dir.join("data");
    tests::loader_dataset(&data, 24, 256);

    // 6 MiB through a 2 MiB/s disk: ~3 s of reading.
    drop_caches();
    let slow = SlowDisk::new("stallmon-test-states", &data, 2 * 1024 * 1024).unwrap();
    let throttled = run_loader(&dir, Some(&slow), true, 1, mode);
    drop(slow);
    let (w_cpu, w_sto, w_ipc, w_oth) = role_states(&throttled, "worker");
    let (f_cpu, f_sto, f_ipc, f_oth) = role_states(&throttled, "feeder");
    let f_total = f_cpu + f_sto + f_ipc + f_oth;
    println!(
        "{mode:?} throttled: workers cpu {w_cpu:.2} storage {w_sto:.2} ipc {w_ipc:.2} other {w_oth:.2}; feeder cpu {f_cpu:.2} storage {f_sto:.2} ipc {f_ipc:.2} other {f_oth:.2}"
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
    let cached = run_loader(&dir, None, false, 10, mode);
    let (w_cpu, w_sto, w_ipc, w_oth) = role_states(&cached, "worker");
    let w_total = w_cpu + w_sto + w_ipc + w_oth;
    println!(
        "{mode:?} page cache: workers cpu {w_cpu:.3} storage {w_sto:.3} ipc {w_ipc:.3} other {w_oth:.3}"
    );
    assert!(
        w_sto / w_total < 0.05 && w_sto < 0.05,
        "workers storage_wait {w_sto:.3} s ({:.1}%) from page cache",
        100.0 * w_sto / w_total
    );

    // Pipe reads are ipc, file reads are file.
    for s in [&throttled, &cached] {
        match mode {
            Mode::Syscalls => {
                assert!(read_entry(s, "feeder", "ipc")["count"].as_u64().unwrap() > 0);
                assert!(
                    read_entry(s, "worker", "file")["bytes"].as_u64().unwrap() >= 24 * 256 * 1024
                );
            }
            Mode::Default => {
                assert!(
                    stall_entry(s, "feeder", "ipc")["latency"]["count"]
                        .as_u64()
                        .unwrap()
                        > 0
                );
                assert!(task_io(s, "worker")["read_bytes"].as_u64().unwrap() >= 24 * 256 * 1024);
            }
        }
    }
    // Throttled reads sleep: file stalls of the workers.
    assert!(
        stall_entry(&throttled, "worker", "file")["latency"]["count"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[test]
fn thread_states_follow_the_bottleneck() {
    thread_states(Mode::Default);
}

#[test]
fn thread_states_follow_the_bottleneck_syscalls() {
    thread_states(Mode::Syscalls);
}

const METRICS: [&str; 10] = [
    "stallmon_block_io_latency_seconds_bucket",
    "stallmon_block_io_queue_seconds_bucket",
    "stallmon_block_io_bytes_total",
    "stallmon_read_stall_seconds_bucket",
    "stallmon_read_latency_seconds_bucket",
    "stallmon_read_bytes_total",
    "stallmon_task_read_bytes_total",
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
        "--syscalls".into(),
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

    assert!(
        prom::unknown_families(&text).is_empty(),
        "families missing from tests::prom::STALLMON_METRICS: {:?}",
        prom::unknown_families(&text)
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
    // A real question: the job's worker read p99 over the last minute, per call and per stall.
    for q in [
        "histogram_quantile(0.99, sum by (le) (rate(stallmon_read_latency_seconds_bucket{role=\"worker\",fd_kind=\"file\"}[1m])))",
        "histogram_quantile(0.99, sum by (le) (rate(stallmon_read_stall_seconds_bucket{role=\"worker\",fd_kind=\"file\"}[1m])))",
    ] {
        let v = server.wait_for_series(q, Duration::from_secs(30)).unwrap();
        println!("{q}: {v}");
    }
    // Interrupted, stallmon stops the command it started and exits with its status (SIGTERM).
    let done = tracer.stop().unwrap();
    assert_eq!(done.status.code(), Some(143), "{}", done.stderr);
    assert!(
        done.stderr.contains("stopped (interrupted)"),
        "{}",
        done.stderr
    );
}
