//! Validation of the GPU idle-time attribution against a workload that knows its own truth
//! (the scenarios of the attribution contract, "Validation"; docs/method.md shows the figures).
//!
//! `tests/workloads/trainloop.py` imitates a training loop whose "GPU steps" drive a simulated
//! GPU of the stand-in NVML library (`tests/nvml-standin`, loaded with `--nvml-lib`: the same NVML
//! code path as a real GPU), with data read from real files by real worker processes (or by the
//! loop itself), and writes its own record of why the GPU was idle with the contract's
//! definitions. Each scenario runs it under `stallmon trace --json` and checks that the dominant
//! cause is right and that every cause's attributed seconds are within 10% of the true total idle
//! time of the truth: `|attributed_c - truth_c| <= 0.10 * truth_idle_total`. Each scenario runs in
//! stallmon's default mode; the storage-bound and CPU-bound ones also with `--syscalls`.
//!
//! The workload's own timeline runs from its first statement (`t0`) to just before it exits
//! (`t1`); stallmon's GPU timeline runs from when the tracer started sampling, before the job
//! was released (`g0`, the start of the first sample in the record file), to when it stopped
//! (`g1`). The test
//! completes the truth with those two edges, using the contract's definitions:
//! - `[g0, t0)`: the interpreter starting: **host**, except the feeder's run-queue delay
//!   (runnable, waiting for a CPU), which is **other**;
//! - `[t1, g1)`: the job has exited (stallmon notices within one 100 ms tick): **other**.
//!
//! Privileged (eBPF, cgroups): these tests fail, never skip, when they cannot run. Run with
//! `cargo build -p monitor-userspace && cargo test -p tests --test attribution -- --test-threads=1
//! --nocapture` to see the tables.

use std::time::{Duration, Instant};

use serde_json::Value;
use tests::{
    SlowDisk, Tracer, job, metric_sum, require_privileged,
    scenario::{
        Figures, check_bounds, check_dominant, check_report_reproduces, complete_truth, dataset,
        gpu_timeline_bounds, outputs, table, trainloop_argv,
    },
};

struct Scenario {
    name: &'static str,
    /// trainloop.py arguments beyond data/output paths.
    args: &'static [&'static str],
    /// Throttle the job's reads to this many bytes/s (blkio cgroup).
    throttle: Option<u64>,
    /// Read the dataset into the page cache first (else evict it from the cache).
    warm: bool,
}

/// Runs a scenario under stallmon and returns (attributed, truth, stallmon's verdict).
fn run_scenario(sc: &Scenario) -> (Figures, Figures, String) {
    run_scenario_in(sc, &[])
}

/// The same, with extra stallmon flags (`--syscalls`).
fn run_scenario_in(sc: &Scenario, extra: &[&str]) -> (Figures, Figures, String) {
    require_privileged();
    let data = dataset(sc.warm);
    let name = format!("{}{}", sc.name, extra.concat());
    let out = outputs(&name);
    let argv = trainloop_argv(&data, &out, sc.args);
    let slow = sc.throttle.map(|bps| {
        SlowDisk::new(&format!("stallmon-attr-{}", sc.name), &data, bps)
            .expect("creating the blkio cgroup")
    });
    let argv = match &slow {
        Some(s) => s.wrap(&argv),
        None => argv,
    };
    let mut args = vec![
        "--json".to_string(),
        "--record".into(),
        out.record.display().to_string(),
    ];
    args.extend(out.gpus.args());
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--".into());
    args.extend(argv);
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let fin = Tracer::launch("trace", &arg_refs, &out.gpus.env())
        .unwrap()
        .wait()
        .unwrap();
    drop(slow);
    assert!(
        fin.status.success(),
        "stallmon/workload failed ({}): {}",
        fin.status,
        fin.stderr
    );
    let summary = fin.summary().unwrap();
    let gpus = job(&summary)["gpu"].as_array().expect("gpu array").clone();
    assert_eq!(gpus.len(), 1, "one simulated GPU: {summary}");
    assert_eq!(gpus[0]["simulated"], true);
    let live = Figures::from_summary_gpu(&gpus[0]);

    let truth: Value = serde_json::from_str(&std::fs::read_to_string(&out.truth).unwrap()).unwrap();
    assert_eq!(
        truth["prepared_in_run"], false,
        "the dataset must exist before the run"
    );
    let (truth_fig, head, tail) = complete_truth(&truth, gpu_timeline_bounds(&out.record));
    let verdict = job(&summary)["gpu_verdicts"][0]
        .as_str()
        .unwrap_or("?")
        .to_string();
    println!(
        "{}(run {:.1} s; {} steps, {} batches; verdict: {verdict})",
        table(&name, &live, &truth_fig, head, tail),
        started.elapsed().as_secs_f64(),
        truth["steps"],
        truth["batches"],
    );

    // The simulated GPU saw exactly the workload's steps over exactly its timeline.
    assert!(
        (live.wall - truth_fig.wall).abs() < 1e-6,
        "wall {} vs GPU timeline {}",
        live.wall,
        truth_fig.wall
    );
    assert!(
        (live.busy - truth_fig.busy).abs() < 1e-3,
        "busy {} vs the workload's steps {}",
        live.busy,
        truth_fig.busy
    );
    // Conservation.
    assert!(
        (live.busy + live.idle_total() - live.wall).abs() < 1e-6 * live.wall,
        "conservation: {live:?}"
    );
    check_report_reproduces(&out.record, &gpus);
    (live, truth_fig, verdict)
}

/// Storage-bound: 4 workers read through a 4 MiB/s throttle, bypassing the page cache; cheap
/// preprocessing; short GPU steps. Most idle time is io.
fn storage_scenario() -> Scenario {
    Scenario {
        name: "storage",
        args: &[
            "--workers",
            "4",
            "--batch-files",
            "4",
            "--cpu-ms",
            "1",
            "--gpu-ms",
            "60",
            "--uncached",
            "--seconds",
            "15",
        ],
        throttle: Some(4 << 20),
        warm: false,
    }
}

fn storage_bound(extra: &[&str]) {
    let sc = storage_scenario();
    let (live, truth, verdict) = run_scenario_in(&sc, extra);
    check_dominant(sc.name, &live, &truth, 0);
    assert!(verdict.contains("storage-bound"), "{verdict}");
    check_bounds(sc.name, &live, &truth);
}

#[test]
fn storage_bound_is_io() {
    storage_bound(&[]);
}

#[test]
fn storage_bound_is_io_syscalls() {
    storage_bound(&["--syscalls"]);
}

/// CPU-bound preprocessing: data in the page cache, 4 workers burn 25 ms of CPU per file on 2
/// cores. Most idle time is preprocess, io near 0.
fn cpu_bound(extra: &[&str]) {
    let sc = Scenario {
        name: "cpu",
        args: &[
            "--workers",
            "4",
            "--batch-files",
            "4",
            "--cpu-ms",
            "25",
            "--gpu-ms",
            "20",
            "--seconds",
            "15",
        ],
        throttle: None,
        warm: true,
    };
    let (live, truth, verdict) = run_scenario_in(&sc, extra);
    check_dominant(sc.name, &live, &truth, 1);
    assert!(verdict.contains("preprocessing-bound"), "{verdict}");
    check_bounds(sc.name, &live, &truth);
}

#[test]
fn cpu_bound_preprocessing_is_preprocess() {
    cpu_bound(&[]);
}

#[test]
fn cpu_bound_preprocessing_is_preprocess_syscalls() {
    cpu_bound(&["--syscalls"]);
}

/// GPU-bound: data always ready (page cache, cheap preprocessing, 8 batches prefetched), long
/// GPU steps, 3 ms of host work per step. Little idle time, io near 0.
#[test]
fn gpu_bound_has_little_idle() {
    let sc = Scenario {
        name: "gpu",
        args: &[
            "--workers",
            "4",
            "--batch-files",
            "4",
            "--cpu-ms",
            "2",
            "--host-ms",
            "3",
            "--prefetch",
            "8",
            "--gpu-ms",
            "150",
            "--seconds",
            "15",
        ],
        throttle: None,
        warm: true,
    };
    let (live, truth, verdict) = run_scenario(&sc);
    assert!(
        truth.idle_total() < 0.10 * truth.wall,
        "the workload is not GPU-bound by its own truth: {truth:?}"
    );
    assert!(verdict.contains("GPU-bound"), "{verdict}");
    check_bounds(sc.name, &live, &truth);
}

/// Synchronous loading (num_workers=0) from throttled storage: the training loop reads 4 files
/// per batch itself through a 4 MiB/s throttle. Most idle time is io (the feeder's own reads).
#[test]
fn synchronous_loading_is_io() {
    let sc = Scenario {
        name: "sync",
        args: &[
            "--workers",
            "0",
            "--batch-files",
            "4",
            "--cpu-ms",
            "1",
            "--gpu-ms",
            "60",
            "--uncached",
            "--seconds",
            "15",
        ],
        throttle: Some(4 << 20),
        warm: false,
    };
    let (live, truth, verdict) = run_scenario(&sc);
    check_dominant(sc.name, &live, &truth, 0);
    assert!(
        verdict.contains("the training loop's own reads"),
        "{verdict}"
    );
    check_bounds(sc.name, &live, &truth);
}

/// Whether NVML's library can be loaded on this machine.
fn nvml_loadable() -> bool {
    ["libnvidia-ml.so.1", "libnvidia-ml.so"].iter().any(|name| {
        let c = std::ffi::CString::new(*name).unwrap();
        // SAFETY: dlopen with a valid C string; the handle is closed at once.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY) };
        if h.is_null() {
            false
        } else {
            // SAFETY: a handle dlopen returned.
            unsafe { libc::dlclose(h) };
            true
        }
    })
}

/// Without NVML tracing still works: GPU attribution is disabled with a reason on stderr and in
/// the summary.
#[test]
fn no_nvml_disables_gpu_attribution_only() {
    require_privileged();
    let fin = Tracer::start(&["--json", "--", "true"])
        .unwrap()
        .wait()
        .unwrap();
    assert!(fin.status.success(), "{}: {}", fin.status, fin.stderr);
    let summary = fin.summary().unwrap();
    let disabled = summary["gpu_disabled"].as_str();
    if nvml_loadable() {
        // A GPU host: NVML works or says why not; either way consistently.
        println!("NVML is loadable here; gpu_disabled = {disabled:?}");
        if let Some(why) = disabled {
            assert!(fin.stderr.contains(why), "{}", fin.stderr);
        }
    } else {
        let why = disabled.unwrap_or_else(|| panic!("gpu_disabled not set: {summary}"));
        assert!(why.starts_with("GPU attribution disabled:"), "{why}");
        assert!(
            fin.stderr.contains("GPU attribution disabled:"),
            "stderr: {}",
            fin.stderr
        );
        assert_eq!(job(&summary)["gpu"].as_array().map_or(0, Vec::len), 0);
        println!("no NVML: {why}");
    }
    assert_eq!(job(&summary)["exit_status"], 0);
}

/// The simulated GPU is lost mid-run (the stand-in NVML answers GPU_IS_LOST from then on):
/// stallmon keeps tracing, reports the GPU stale (log and /metrics) and ends cleanly with the
/// job's status.
#[test]
fn gpu_error_mid_run_ends_cleanly() {
    require_privileged();
    let data = dataset(true);
    let out = outputs("gpu-error");
    let argv = trainloop_argv(
        &data,
        &out,
        &[
            "--workers",
            "1",
            "--cpu-ms",
            "1",
            "--gpu-ms",
            "50",
            "--seconds",
            "7",
        ],
    );
    let mut args = vec![
        "--json".to_string(),
        "--record".into(),
        out.record.display().to_string(),
    ];
    args.extend(out.gpus.args());
    args.push("--".into());
    args.extend(argv);
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let tracer = Tracer::launch("trace", &arg_refs, &out.gpus.env()).unwrap();
    let started = Instant::now();
    // Let some steps through, then lose the GPU.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        out.gpus.path().join("gpu0/busy").is_file(),
        "the workload wrote no GPU steps"
    );
    out.gpus.set_error(0, "GPU_IS_LOST");
    let broken_at = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(2500));
    let metrics = tracer.scrape().unwrap();
    let stale = metric_sum(&metrics, "stallmon_gpu_stale", &[]);
    let fin = tracer.wait().unwrap();
    assert!(
        fin.status.success(),
        "stallmon must end cleanly with the job's status: {} {}",
        fin.status,
        fin.stderr
    );
    let summary = fin.summary().unwrap();
    assert_eq!(job(&summary)["exit_status"], 0);
    assert!(
        fin.stderr.contains("GPU is stale"),
        "the GPU error is not reported: {}",
        fin.stderr
    );
    assert_eq!(
        fin.stderr.matches("GPU is stale").count(),
        1,
        "said once: {}",
        fin.stderr
    );
    assert_eq!(stale, 1.0, "stallmon_gpu_stale after the error:\n{metrics}");
    let g = &job(&summary)["gpu"][0];
    assert!(g["stale"].is_string(), "{g}");
    assert!(g["samples"].as_u64().unwrap() > 10, "{g}");
    println!(
        "GPU lost after {broken_at:.1} s of a {:.1} s run: summary gpu = {g}, verdict = {}",
        summary["duration_seconds"],
        job(&summary)["gpu_verdicts"][0]
    );
}
