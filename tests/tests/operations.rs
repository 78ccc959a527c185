//! Privileged tests of what operators rely on: every dashboard panel answers with data from a
//! real Prometheus scraping a live stallmon, capabilities are dropped after attach, and the
//! job label comes from the job's environment.
use std::{process::Command, time::Duration};

use tests::{
    Tracer, gpu::StandinGpus, job, metric_sum, procs::Reaper, prom, python, require_privileged,
    scratch_dir, workload,
};

/// Replaces Grafana's variables the way the dashboard would with the test's job selected and
/// "All" for everything else (so a job filter on a series without job labels shows up empty).
fn expand(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__interval", "5s")
        .replace("$__range", "1m")
        .replace("${datasource}", "")
        .replace("$instance", ".*")
        .replace("$job_name", "dashboard-test")
        .replace("$rank", ".*")
        .replace("$gpu", ".*")
        .replace("$device", ".*")
}

#[test]
fn every_dashboard_panel_returns_data_from_a_live_stallmon() {
    require_privileged();
    let dir = scratch_dir("dashboard");
    let data = dir.join("data");
    tests::loader_dataset(&data, 16, 64);
    // The job's feeder holds a context on a simulated GPU busy 60 ms out of every 100 ms.
    let gpus = StandinGpus::new("dashboard", 1, 100, 200);
    let py = python();
    let mut args: Vec<String> = vec!["--interval".to_string(), "0.5".into()];
    args.extend(gpus.args());
    args.extend([
        "--job-name".into(),
        "dashboard-test".into(),
        "--".into(),
        py.to_string_lossy().into_owned(),
        workload("loader.py").to_string_lossy().into_owned(),
        "--data".into(),
        data.to_string_lossy().into_owned(),
        "--files".into(),
        "16".into(),
        "--rounds".into(),
        "100000".into(),
        "--cpu-ms".into(),
        "2".into(),
        "--drop-cache".into(),
        "--report".into(),
        dir.join("report.json").to_string_lossy().into_owned(),
        "--gpu-dir".into(),
        gpus.path().to_string_lossy().into_owned(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let tracer = Tracer::launch("trace", &args, &gpus.env()).unwrap();

    let server = prom::Prometheus::start(&tracer.addr.to_string()).unwrap();
    server
        .wait_for_series("stallmon_gpu_idle_seconds_total", Duration::from_secs(60))
        .unwrap();
    // Enough scrapes for rate()/increase() windows to hold several samples.
    std::thread::sleep(Duration::from_secs(12));

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            tests::repo_root().join("docs/integrations/grafana/stallmon.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut empty = Vec::new();
    let mut n = 0;
    let mut panels: Vec<&serde_json::Value> = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        panels.push(p);
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
    }
    // Queries of series only `stallmon trace --syscalls` exports may be empty here (this
    // stallmon runs without it), but never a whole panel.
    let syscalls_only = |expr: &str| {
        let mut names = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("stallmon_"))
            .peekable();
        names.peek().is_some()
            && names.all(|w| {
                w.starts_with("stallmon_read_latency_seconds")
                    || w.starts_with("stallmon_read_bytes_total")
            })
    };
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        let mut panel_has_data = false;
        let mut queries = 0;
        for t in p["targets"].as_array().into_iter().flatten() {
            let Some(expr) = t["expr"].as_str() else {
                continue;
            };
            n += 1;
            queries += 1;
            let q = expand(expr);
            let data = server.query(&q).unwrap_or_else(|e| panic!("{q}: {e:#}"));
            let has = data["result"].as_array().is_some_and(|r| !r.is_empty());
            panel_has_data |= has;
            let optional = !has && syscalls_only(expr);
            println!(
                "{} {:<40} {}",
                match (has, optional) {
                    (true, _) => "data ",
                    (false, true) => "n/a  ",
                    (false, false) => "EMPTY",
                },
                title,
                q
            );
            if !has && !optional {
                empty.push(format!("{title}: {q}"));
            }
        }
        if queries > 0 && !panel_has_data {
            empty.push(format!("{title}: no query of the panel has data"));
        }
    }
    // Template variables resolve too.
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str()
            && let Some(inner) = q.strip_prefix("label_values(")
        {
            let selector = inner.rsplit_once(',').unwrap().0;
            let data = server.query(&expand(selector)).unwrap();
            assert!(
                data["result"].as_array().is_some_and(|r| !r.is_empty()),
                "variable {} has no values",
                v["name"]
            );
        }
    }
    let text = tracer.scrape().unwrap();
    assert!(text.contains("job_name=\"dashboard-test\""));
    assert!(
        prom::unknown_families(&text).is_empty(),
        "families missing from tests::prom::STALLMON_METRICS: {:?}",
        prom::unknown_families(&text)
    );
    let _ = tracer.stop();
    assert!(n >= 10, "only {n} panel queries");
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );
}

/// Capabilities after start-up: only CAP_DAC_READ_SEARCH (2) and CAP_SYS_PTRACE (19) remain,
/// in every thread, and tracing still works (new processes are tracked, maps are read).
#[test]
fn capabilities_are_dropped_after_attach() {
    require_privileged();
    let py = python();
    let tracer = Tracer::start(&[
        "--no-gpu",
        "--interval",
        "0.3",
        "--",
        py.to_str().unwrap(),
        "-c",
        "import os,time\ntime.sleep(2)\nif os.fork()==0:\n    time.sleep(3); os._exit(0)\ntime.sleep(4)",
    ])
    .unwrap();
    let pid = tracer.pid();
    std::thread::sleep(Duration::from_millis(500));
    let expected: u64 = (1 << 2) | (1 << 19);
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .collect();
    assert!(tasks.len() > 1, "expected the runtime's threads too");
    for t in tasks {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap();
        for set in ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"] {
            let v = status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{set}:")))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
                .unwrap();
            assert_eq!(
                v & !expected,
                0,
                "{set} of thread {:?} is {v:#x}",
                t.file_name()
            );
            if set == "CapEff" {
                assert_eq!(v, expected, "CapEff {v:#x}");
            }
        }
    }
    // Still tracing: the fork after the drop is tracked.
    std::thread::sleep(Duration::from_secs(3));
    let text = tracer.scrape().unwrap();
    assert_eq!(
        metric_sum(&text, "stallmon_tracked_processes", &["role=\"worker\""]),
        1.0,
        "{text}"
    );
    let done = tracer.wait().unwrap();
    assert!(done.status.success(), "{}", done.stderr);
}

/// The job's identity labels come from the job's environment: SLURM's job id is `hpc_job`,
/// torchrun's run id the `job_name`; `--job-name` wins.
#[test]
fn job_labels_come_from_the_job_environment() {
    require_privileged();
    // Attached by PID: the target's own environment (Slurm).
    let sleeper = Reaper(
        Command::new("sleep")
            .arg("30")
            .env("SLURM_JOB_ID", "4242")
            .spawn()
            .unwrap(),
    );
    let pid = sleeper.pid().to_string();
    let tracer = Tracer::start(&["--pid", &pid, "--no-gpu"]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let text = tracer.scrape().unwrap();
    assert!(text.contains("hpc_job=\"4242\""), "{text}");
    assert!(text.contains("job_name=\"sleep\""), "{text}");
    let _ = tracer.stop();

    // An explicit --job-name wins.
    let tracer = Tracer::start(&["--pid", &pid, "--no-gpu", "--job-name", "resnet-a"]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let text = tracer.scrape().unwrap();
    assert!(text.contains("job_name=\"resnet-a\""));
    let _ = tracer.stop();

    // A started command inherits the environment (torchrun sets TORCHELASTIC_RUN_ID).
    let out = Command::new(tests::stallmon_bin())
        .args([
            "trace",
            "--listen",
            "127.0.0.1:0",
            "--no-gpu",
            "--json",
            "--",
            "true",
        ])
        .env("TORCHELASTIC_RUN_ID", "elastic-7")
        .output()
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job(&s)["labels"]["job_name"], "elastic-7");
}
