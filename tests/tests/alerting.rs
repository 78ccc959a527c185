//! Alerts delivered end to end: stallmon traces a storage-bound training job, a real Prometheus
//! scrapes it and evaluates the project's rules (docs/integrations/prometheus/alerts.yml and
//! recording.yml), a real Alertmanager routes the storage-stall alert (`StallmonGPUIdleIOBound`)
//! to a webhook receiver run by this test, and the test checks what arrives: the job's labels and
//! the runbook link into the operator guide.
//!
//! The rules are the project's, except that a test copy scales time down ([`TIMING`]): every
//! `for:` becomes 5 s and every range selector 20 s (production: 5 or 10 minutes each; over a
//! job only seconds old, `rate(x[10m])` is a fraction of the real rate, so thresholds would be
//! crossed minutes late), evaluated every [`INTERVAL`]. Thresholds, labels and annotations are the
//! real ones. Alertmanager groups with a 1-second wait.
//!
//! Privileged (eBPF, a blkio cgroup): fails, never skips, when it cannot run; Alertmanager
//! (Debian `prometheus-alertmanager`) is installed if missing, and its absence is a failure under
//! `CI=true`. Run with `cargo test -p tests --test alerting -- --nocapture --test-threads=1` to see
//! the payload.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde_json::Value;
use serde_yaml::Value as Yaml;
use tests::{
    SlowDisk, Tracer,
    alerting::{
        AlertingPrometheus, Alertmanager, AlertmanagerOptions, RuleTiming, WebhookReceiver,
        alertmanager_binary, missing_tool, rules_for_tests,
    },
    gpu::StandinGpus,
    prom, python, require_privileged, scratch_dir,
};

/// The storage-stall alert.
const ALERT: &str = "StallmonGPUIdleIOBound";
const JOB_NAME: &str = "alerting-e2e";
/// Scrape and rule evaluation interval.
const INTERVAL: Duration = Duration::from_secs(1);
/// The test copy of the rules: every `for:` and every range selector (production: 5 or 10
/// minutes each) scaled down.
const TIMING: RuleTiming = RuleTiming {
    for_: Duration::from_secs(5),
    range: Duration::from_secs(20),
    interval: INTERVAL,
};
/// From Prometheus's start to the alert at the webhook, at most.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(150);

fn prometheus_dir() -> PathBuf {
    tests::repo_root().join("docs/integrations/prometheus")
}

fn operator_guide() -> String {
    std::fs::read_to_string(tests::repo_root().join("docs/operator-guide.md")).unwrap()
}

/// GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to dashes.
fn anchor(heading: &str) -> String {
    heading
        .trim_start_matches('#')
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Anchors of every heading of the operator guide.
fn guide_anchors() -> Vec<String> {
    operator_guide()
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(anchor)
        .collect()
}

// ============================================================================================
// PORT ME WHEN THE CLI CHANGES: the only code here that knows how stallmon is started.
// ============================================================================================

/// Starts stallmon on a storage-bound training job, with a simulated GPU: the bundled
/// `trainloop.py` (4 DataLoader-style workers reading a 50 MB dataset that is evicted from the
/// page cache, through a blkio throttle of 4 MiB/s; 60 ms GPU steps written to the file that
/// stallmon reads as its simulated GPU), traced by `stallmon trace --simulate-gpu FILE
/// --job-name NAME -- CMD` with metrics on a free loopback port.
///
/// stallmon traces it with the stand-in NVML library (one simulated GPU). It must return a [`StorageBoundJob`] whose metrics address serves stallmon's metrics for the
/// job, labelled `job_name="<job_name>"`, with GPU "0" mostly idle for cause "io".
fn start_stallmon_on_storage_bound_job(job_name: &str) -> StorageBoundJob {
    let data = tests::scenario::dataset(false);
    let gpus = StandinGpus::new("alerting", 1, 100, 200);
    let slow =
        SlowDisk::new("stallmon-alerting", &data, 4 << 20).expect("creating the blkio cgroup");
    // Outlives the test's deadline; the guard ends it as soon as the alert has arrived.
    let job = tests::scenario::operations_job(&data, &gpus, 300, true);
    let mut args: Vec<String> = vec!["--interval".into(), "500ms".into()];
    args.extend(gpus.args());
    args.extend(["--job-name".into(), job_name.into(), "--".into()]);
    args.extend(slow.wrap(&job));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Guard first: should Tracer::start fail, the cgroup (and any process in it) still goes.
    let mut guard = StorageBoundJob {
        tracer: None,
        slow: Some(slow),
        _gpus: gpus,
    };
    guard.tracer = Some(
        Tracer::launch("trace", &args, &guard._gpus.env())
            .expect("starting stallmon on the storage-bound job"),
    );
    guard
}

// ============================================================================================

/// stallmon and the job it traces; on drop, stallmon is interrupted (killed if it does not exit
/// within 10 s), every process left in the job's cgroup is killed, and the cgroup removed.
struct StorageBoundJob {
    tracer: Option<Tracer>,
    slow: Option<SlowDisk>,
    _gpus: StandinGpus,
}

impl StorageBoundJob {
    fn metrics_addr(&self) -> SocketAddr {
        self.tracer.as_ref().unwrap().addr
    }

    /// Fails if stallmon has exited.
    fn check_alive(&mut self) -> Result<()> {
        let t = self.tracer.as_mut().unwrap();
        if let Some(status) = t.child.try_wait()? {
            bail!("stallmon exited early ({status}): {}", t.stderr.join("\n"));
        }
        Ok(())
    }
}

impl Drop for StorageBoundJob {
    fn drop(&mut self) {
        if let Some(mut t) = self.tracer.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(t.child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = t.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = t.child.kill();
            let _ = t.child.wait();
        }
        if let Some(slow) = self.slow.take() {
            let procs = slow.dir.join("cgroup.procs");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let pids: Vec<i32> = std::fs::read_to_string(&procs)
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect();
                if pids.is_empty() || Instant::now() > deadline {
                    break;
                }
                for pid in pids {
                    // SAFETY: plain kill(2) of the job's processes, which this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            drop(slow);
        }
    }
}

/// The alert `ALERT` for `JOB_NAME`, firing, in a webhook payload.
fn storage_alert(payload: &Value) -> Option<&Value> {
    payload["alerts"].as_array()?.iter().find(|a| {
        a["status"] == "firing"
            && a["labels"]["alertname"] == ALERT
            && a["labels"]["job_name"] == JOB_NAME
    })
}

#[test]
fn the_storage_stall_alert_reaches_the_webhook_with_the_job_labels_and_runbook() {
    require_privileged();
    if let Err(e) = prom::prometheus_binary() {
        let _: Option<()> = missing_tool(&format!("prometheus: {e:#}"));
        return;
    }
    if let Err(e) = alertmanager_binary() {
        let _: Option<()> = missing_tool(&format!("alertmanager: {e:#}"));
        return;
    }

    // The project's rules, time scaled down (see TIMING).
    let rules_dir = scratch_dir("alerting-rules");
    let alerts = rules_dir.join("alerts.yml");
    let recording = rules_dir.join("recording.yml");
    let n = rules_for_tests(&prometheus_dir().join("alerts.yml"), &alerts, TIMING).unwrap();
    assert!(n.fors >= 6 && n.ranges >= 6, "alerts.yml: {n:?}");
    rules_for_tests(&prometheus_dir().join("recording.yml"), &recording, TIMING).unwrap();
    prom::promtool(
        &rules_dir,
        &["check", "rules", "alerts.yml", "recording.yml"],
    )
    .unwrap_or_else(|e| panic!("the test copy of the rules is invalid: {e:#}"));

    let hook = WebhookReceiver::start().unwrap();
    let am = Alertmanager::start(&hook.url(), AlertmanagerOptions::default()).unwrap();
    let mut job = start_stallmon_on_storage_bound_job(JOB_NAME);
    let target = job.metrics_addr().to_string();
    let server = AlertingPrometheus::start(
        std::slice::from_ref(&target),
        &[alerts, recording],
        am.addr(),
        INTERVAL,
    )
    .unwrap();
    println!(
        "stallmon on {target}, prometheus on {}, alertmanager on {}, webhook {}",
        server.addr(),
        am.addr(),
        hook.url()
    );

    let started = Instant::now();
    let mut ticks = 0u32;
    let payload = hook
        .wait_for(
            DELIVERY_DEADLINE,
            |p| storage_alert(p).is_some(),
            || {
                job.check_alive()?;
                ticks += 1;
                if ticks.is_multiple_of(5) {
                    let states: Vec<String> = server
                        .alerts()
                        .unwrap_or_default()
                        .iter()
                        .map(|a| format!("{}={}", a["labels"]["alertname"], a["state"]))
                        .collect();
                    let value = |q: &str| {
                        server
                            .query(q)
                            .ok()
                            .and_then(|r| r.first().map(|s| s["value"][1].clone()))
                            .unwrap_or(Value::Null)
                    };
                    let sel = format!("job_name=\"{JOB_NAME}\"");
                    let idle = value(&format!(
                        "sum(rate(stallmon_gpu_idle_seconds_total{{{sel}}}[20s]))"
                    ));
                    let io = value(&format!(
                        "sum(rate(stallmon_gpu_idle_seconds_total{{cause=\"io\",{sel}}}[20s])) \
                         / sum(rate(stallmon_gpu_idle_seconds_total{{{sel}}}[20s]))"
                    ));
                    println!(
                        "{:>5.1} s: GPU idle fraction {idle}, io share of idle {io}; \
                         prometheus alerts {states:?}",
                        started.elapsed().as_secs_f64()
                    );
                }
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    let Some(payload) = payload else {
        panic!(
            "{ALERT} did not reach the webhook within {DELIVERY_DEADLINE:?}.\n\
             prometheus rules: {:?}\nprometheus alerts: {:?}\nalertmanager alerts: {:?}\n\
             webhook got: {:?}\nprometheus log:\n{}\nalertmanager log:\n{}",
            server.get_json("/api/v1/rules?type=alert"),
            server.alerts(),
            am.alerts(),
            hook.received(),
            server.log(),
            am.log()
        )
    };
    let took = started.elapsed();
    drop(job); // the job and stallmon are no longer needed
    println!(
        "\n{ALERT} delivered to the webhook {:.1} s after Prometheus started; payload:\n{}\n",
        took.as_secs_f64(),
        serde_json::to_string_pretty(&payload).unwrap()
    );

    // The Alertmanager webhook format, version 4.
    assert_eq!(payload["version"], "4", "{payload}");
    assert_eq!(payload["status"], "firing");
    assert_eq!(payload["receiver"], "webhook");
    let alert = storage_alert(&payload).unwrap();
    // The job's labels, as the rule aggregates them.
    let labels = &alert["labels"];
    assert_eq!(labels["job_name"], JOB_NAME);
    assert_eq!(labels["instance"], target.as_str());
    assert_eq!(labels["gpu"], "0");
    assert_eq!(labels["severity"], "warning");
    assert_eq!(payload["commonLabels"]["job_name"], JOB_NAME);
    // The annotations of alerts.yml, rendered with the job's values, and the runbook link into
    // the operator guide's section for this alert.
    let ann = &alert["annotations"];
    let summary = ann["summary"].as_str().unwrap_or("");
    assert!(
        summary.contains(JOB_NAME) && summary.contains(&target),
        "summary: {summary}"
    );
    assert!(
        ann["description"]
            .as_str()
            .is_some_and(|d| d.contains("cause=\"io\"")),
        "description: {}",
        ann["description"]
    );
    let runbook = ann["runbook_url"]
        .as_str()
        .unwrap_or_else(|| panic!("no runbook_url annotation: {ann}"));
    let (page, fragment) = runbook
        .split_once('#')
        .expect("runbook_url without #anchor");
    assert!(page.ends_with("/operator-guide.md"), "{runbook}");
    assert_eq!(fragment, anchor(&format!("### {ALERT}")), "{runbook}");
    assert!(
        guide_anchors().iter().any(|a| a == fragment),
        "the operator guide has no section #{fragment}"
    );
    assert!(alert["startsAt"].as_str().is_some_and(|s| !s.is_empty()));
}

/// Every alert of alerts.yml links to its own section of the operator guide (unprivileged).
#[test]
fn every_alert_has_a_runbook_link_to_its_section() {
    let text = std::fs::read_to_string(prometheus_dir().join("alerts.yml")).unwrap();
    let doc: Yaml = serde_yaml::from_str(&text).unwrap();
    let anchors = guide_anchors();
    let mut n = 0;
    for group in doc["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let Some(name) = rule["alert"].as_str() else {
                continue;
            };
            n += 1;
            let url = rule["annotations"]["runbook_url"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no runbook_url"));
            let (page, fragment) = url
                .split_once('#')
                .unwrap_or_else(|| panic!("{name}: {url} has no anchor"));
            assert!(
                page.starts_with("https://") && page.ends_with("/operator-guide.md"),
                "{name}: {url}"
            );
            assert_eq!(fragment, anchor(&format!("### {name}")), "{name}: {url}");
            assert!(
                anchors.iter().any(|a| a == fragment),
                "{name}: the operator guide has no heading for #{fragment}"
            );
        }
    }
    assert!(n >= 6, "only {n} alerts");
}

/// The operator guide's remediation hook: its Alertmanager route targets the storage-stall alert
/// with a webhook, its script is valid Python, and the guide says stallmon runs no commands.
#[test]
fn the_remediation_hook_in_the_operator_guide_is_consistent() {
    let guide = operator_guide();
    let section = guide
        .split("### Remediation hook")
        .nth(1)
        .expect("no \"Remediation hook\" section in the operator guide");
    let section = section.split("\n## ").next().unwrap();
    assert!(
        section.contains("stallmon itself never runs commands"),
        "the section must say that stallmon runs no commands"
    );
    let block = |lang: &str| -> String {
        let start = section
            .find(&format!("```{lang}\n"))
            .unwrap_or_else(|| panic!("no ```{lang} block"))
            + lang.len()
            + 4;
        let len = section[start..].find("```").unwrap();
        section[start..start + len].to_string()
    };
    let am: Yaml = serde_yaml::from_str(&block("yaml")).expect("the Alertmanager snippet is YAML");
    let route = &am["route"]["routes"][0];
    assert!(
        route["matchers"][0]
            .as_str()
            .is_some_and(|m| m.contains(ALERT)),
        "the route does not match {ALERT}: {route:?}"
    );
    assert_eq!(
        route["continue"], true,
        "the route must not swallow the alert"
    );
    assert_eq!(am["receivers"][0]["name"], route["receiver"]);
    assert!(am["receivers"][0]["webhook_configs"][0]["url"].is_string());
    let script = block("python");
    for needle in [
        ALERT,
        "\"trace\"",
        "\"--duration\", \"60\"",
        "\"--record\"",
        "\"--pid\"",
    ] {
        assert!(script.contains(needle), "the hook script lacks {needle}");
    }
    let dir = scratch_dir("alerting-hook");
    let path = dir.join("stallmon-capture-hook.py");
    std::fs::write(&path, &script).unwrap();
    let out = Command::new(python())
        .args(["-m", "py_compile"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the hook script does not compile: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
