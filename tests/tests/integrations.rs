//! Checks of the operators' kit in docs/integrations: Prometheus rules (with
//! promtool and a real Prometheus server), the Grafana dashboard, the Zabbix
//! template, the systemd unit and the Kubernetes manifests.
//!
//! promtool and prometheus (Debian package `prometheus`) are required: the tests
//! fail, never skip, when they are missing.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml::Value as Yaml;
use tests::prom::{self, PromOptions, Prometheus, is_stallmon_series};

fn integrations_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/integrations")
}

fn prometheus_dir() -> PathBuf {
    integrations_dir().join("prometheus")
}

fn read(rel: &str) -> String {
    let path = integrations_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml(rel: &str) -> Yaml {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn seq(v: &Yaml) -> &[Yaml] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

fn str_of<'a>(v: &'a Yaml, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

fn promtool_or_panic(args: &[&str]) -> String {
    prom::promtool(&prometheus_dir(), args).unwrap_or_else(|e| panic!("{e:#}"))
}

// ------------------------------------------------------------------ PromQL

/// `expr` with the contents of string literals removed (label values, regexes).
fn strip_strings(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' && q != '`' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                    out.push(c);
                }
            }
            None => {
                if c == '"' || c == '\'' || c == '`' {
                    quote = Some(c);
                }
                out.push(c);
            }
        }
    }
    out
}

/// Identifiers in a PromQL expression (outside string literals).
fn identifiers(expr: &str) -> Vec<String> {
    strip_strings(expr)
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| {
            t.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        })
        .map(str::to_string)
        .collect()
}

/// stallmon series names used in `expr` (identifiers starting with stallmon_
/// that are not recording rule names).
fn stallmon_series_in(expr: &str) -> Vec<String> {
    identifiers(expr)
        .into_iter()
        .filter(|t| t.starts_with("stallmon_") && !t.contains(':'))
        .collect()
}

/// Recording-rule names (level:metric:operations) used in `expr`.
fn recorded_names_in(expr: &str) -> Vec<String> {
    identifiers(expr)
        .into_iter()
        .filter(|t| t.contains(':') && t.contains("stallmon"))
        .collect()
}

/// Every `metric{...}` selector in `expr` as (metric, label matchers text);
/// a metric without braces gets an empty matcher text.
fn selectors(expr: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("stallmon_") {
        let start = i + pos;
        let before_ok = start == 0 || {
            let c = bytes[start - 1] as char;
            !(c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '"')
        };
        let mut end = start;
        while end < bytes.len() && {
            let c = bytes[end] as char;
            c.is_ascii_alphanumeric() || c == '_' || c == ':'
        } {
            end += 1;
        }
        let name = &expr[start..end];
        if before_ok && !name.contains(':') {
            let matchers = if expr[end..].starts_with('{') {
                let close = expr[end..].find('}').expect("unbalanced braces") + end;
                expr[end + 1..close].to_string()
            } else {
                String::new()
            };
            out.push((name.to_string(), matchers));
        }
        i = end;
    }
    out
}

fn alert_rules() -> Vec<Yaml> {
    let rules = yaml("prometheus/alerts.yml");
    seq(&rules["groups"])
        .iter()
        .flat_map(|g| seq(&g["rules"]).to_vec())
        .collect()
}

fn recording_rules() -> Vec<Yaml> {
    let rules = yaml("prometheus/recording.yml");
    seq(&rules["groups"])
        .iter()
        .flat_map(|g| seq(&g["rules"]).to_vec())
        .collect()
}

#[test]
fn promql_helpers() {
    assert_eq!(
        stallmon_series_in(
            r#"sum by (gpu) (rate(stallmon_gpu_idle_seconds_total{cause="stallmon_x"}[5m])) / job_name:stallmon_y:rate5m"#
        ),
        vec!["stallmon_gpu_idle_seconds_total"]
    );
    assert_eq!(
        recorded_names_in("a / job_name:stallmon_y:rate5m"),
        vec!["job_name:stallmon_y:rate5m"]
    );
    assert_eq!(
        selectors(r#"rate(stallmon_a{x="1", y=~"$y"}[1m]) + stallmon_b"#),
        vec![
            ("stallmon_a".to_string(), r#"x="1", y=~"$y""#.to_string()),
            ("stallmon_b".to_string(), String::new())
        ]
    );
}

// ------------------------------------------------------------------ Prometheus rules

#[test]
fn promtool_check_rules() {
    let out = promtool_or_panic(&["check", "rules", "alerts.yml", "recording.yml"]);
    assert!(out.contains("SUCCESS: 6 rules found"), "{out}");
    assert!(!out.contains("FAILED"), "{out}");
}

#[test]
fn promtool_test_rules() {
    let out = promtool_or_panic(&["test", "rules", "alerts_test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn expected_alerts() {
    let names: Vec<String> = alert_rules()
        .iter()
        .map(|r| str_of(r, "alert").to_string())
        .collect();
    let expected = [
        "StallmonGPUIdleIOBound",
        "StallmonGPUIdlePreprocessBound",
        "StallmonStorageLatencyHigh",
        "StallmonDroppingEvents",
        "StallmonDown",
        "StallmonGPUStale",
    ];
    for name in expected {
        assert!(
            names.iter().any(|n| n == name),
            "alert {name} missing from alerts.yml"
        );
    }
    let group = &yaml("prometheus/alerts.yml")["groups"][0];
    assert_eq!(str_of(group, "name"), "stallmon");
    for rule in alert_rules() {
        let name = str_of(&rule, "alert");
        assert!(
            !str_of(&rule["labels"], "severity").is_empty(),
            "{name}: no severity"
        );
        for annotation in ["summary", "description"] {
            let text = str_of(&rule["annotations"], annotation);
            assert!(
                text.len() > 20,
                "{name}: annotation {annotation} missing or too short"
            );
        }
        assert!(
            str_of(&rule["annotations"], "description").contains("{{"),
            "{name}: description uses no template values"
        );
    }
}

#[test]
fn every_alert_is_tested_firing_and_not_firing() {
    let alerts: BTreeSet<String> = alert_rules()
        .iter()
        .map(|r| str_of(r, "alert").to_string())
        .collect();
    assert!(!alerts.is_empty());
    let tests_file = yaml("prometheus/alerts_test.yml");
    let mut firing: BTreeMap<String, usize> = BTreeMap::new();
    let mut quiet: BTreeMap<String, usize> = BTreeMap::new();
    for test in seq(&tests_file["tests"]) {
        for case in seq(&test["alert_rule_test"]) {
            let name = str_of(case, "alertname").to_string();
            assert!(
                alerts.contains(&name),
                "alerts_test.yml tests unknown alert {name:?}"
            );
            let expectations = seq(&case["exp_alerts"]);
            if expectations.is_empty() {
                *quiet.entry(name).or_default() += 1;
            } else {
                for e in expectations {
                    assert!(
                        e["exp_labels"].as_mapping().is_some_and(|m| !m.is_empty()),
                        "{name}: firing expectation without labels"
                    );
                }
                *firing.entry(name).or_default() += 1;
            }
        }
    }
    for name in &alerts {
        assert!(
            firing.contains_key(name),
            "alert {name} is never tested firing (non-empty exp_alerts) in alerts_test.yml"
        );
        assert!(
            quiet.contains_key(name),
            "alert {name} is never tested not firing (empty exp_alerts) in alerts_test.yml"
        );
    }
}

#[test]
fn rules_use_only_stallmon_metrics_and_defined_recordings() {
    let recorded: HashSet<String> = recording_rules()
        .iter()
        .map(|r| str_of(r, "record").to_string())
        .collect();
    for rule in alert_rules().iter().chain(recording_rules().iter()) {
        let expr = str_of(rule, "expr");
        assert!(!expr.is_empty());
        for name in stallmon_series_in(expr) {
            assert!(is_stallmon_series(&name), "unknown metric {name} in {expr}");
        }
        for name in recorded_names_in(expr) {
            assert!(
                recorded.contains(&name),
                "undefined recording rule {name} in {expr}"
            );
        }
    }
    for name in &recorded {
        let parts: Vec<&str> = name.split(':').collect();
        assert_eq!(parts.len(), 3, "{name} is not level:metric:operations");
    }
}

/// Rules over machine-wide series (block I/O, dropped events: no job labels) neither select nor
/// group by job labels, which those series do not have.
#[test]
fn rules_on_machine_wide_series_use_no_job_labels() {
    let mut n = 0;
    for rule in alert_rules().iter().chain(recording_rules().iter()) {
        let expr = str_of(rule, "expr");
        let series = stallmon_series_in(expr);
        if series.is_empty()
            || !series
                .iter()
                .all(|s| WITHOUT_JOB_LABELS.contains(&family(s)))
        {
            continue;
        }
        n += 1;
        let idents = identifiers(expr);
        for label in [
            "job_name",
            "pod",
            "namespace",
            "container",
            "hpc_job",
            "rank",
        ] {
            assert!(
                !idents.iter().any(|i| i == label),
                "{}{}: {label} on series without job labels: {expr}",
                str_of(rule, "alert"),
                str_of(rule, "record")
            );
        }
    }
    assert!(n >= 3, "only {n} rules over machine-wide series");
}

/// Loads the rule files into a real Prometheus whose stallmon target does not
/// answer: every rule must evaluate without error and StallmonDown must go
/// pending.
#[test]
fn rules_load_and_evaluate_in_prometheus() {
    let dead_target = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
        // listener dropped: nothing answers on that port
    };
    let prom = Prometheus::start_with(PromOptions {
        targets: vec![dead_target],
        scrape_self: true,
        rule_files: vec![
            prometheus_dir().join("alerts.yml"),
            prometheus_dir().join("recording.yml"),
        ],
        ..PromOptions::default()
    })
    .unwrap_or_else(|e| panic!("{e:#}"));

    prom.wait_for_series(r#"up{job="stallmon"} == 0"#, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let alerts = prom.get_json("/api/v1/alerts").unwrap();
        let down = alerts["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["labels"]["alertname"] == "StallmonDown");
        if let Some(a) = down {
            assert_eq!(a["state"], "pending", "{a}");
            assert_eq!(a["labels"]["severity"], "warning");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "StallmonDown never went pending: {alerts}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    let rules = prom.get_json("/api/v1/rules").unwrap();
    let groups = rules["data"]["groups"].as_array().unwrap();
    let names: BTreeSet<&str> = groups.iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(names, BTreeSet::from(["stallmon", "stallmon.recording"]));
    let total: usize = groups
        .iter()
        .map(|g| g["rules"].as_array().unwrap().len())
        .sum();
    assert_eq!(total, alert_rules().len() + recording_rules().len());
    // Wait until every rule has been evaluated once, then none may be unhealthy.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rules = prom.get_json("/api/v1/rules").unwrap();
        let all: Vec<serde_json::Value> = rules["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        for r in &all {
            assert_ne!(r["health"], "err", "rule failed to evaluate: {r}");
        }
        if all.iter().all(|r| r["health"] == "ok") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rules not evaluated: {rules}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The helper in tests::prom against a real server scraping itself.
#[test]
fn prometheus_helper_scrapes_itself() {
    let prom = Prometheus::start_with(PromOptions {
        scrape_self: true,
        ..PromOptions::default()
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(prom.url().starts_with("http://127.0.0.1:"));
    let data = prom
        .wait_for_series(r#"up{job="prometheus"}"#, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(data["resultType"], "vector");
    let up = prom.query_vector(r#"up{job="prometheus"}"#).unwrap();
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].1, 1.0);
    assert_eq!(up[0].0["instance"], prom.addr().to_string());
    prom.wait_for_series("prometheus_build_info", Duration::from_secs(10))
        .unwrap();
    // Scalars and errors.
    assert_eq!(prom.query("1 + 1").unwrap()["resultType"], "scalar");
    let err = prom.query("sum(").unwrap_err().to_string();
    assert!(err.contains("bad_data") || err.contains("parse"), "{err}");
    // Range queries.
    let range = prom
        .query_range(
            r#"up{job="prometheus"}"#,
            Duration::from_secs(30),
            Duration::from_secs(1),
        )
        .unwrap();
    assert_eq!(range["resultType"], "matrix");
    // Nothing scrapes a metric that does not exist.
    assert!(
        prom.wait_for_series("stallmon_target_up", Duration::from_secs(1))
            .is_err()
    );
    let addr = prom.addr();
    drop(prom);
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "prometheus still listening after drop"
    );
}

// ------------------------------------------------------------------ Grafana

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("grafana/stallmon.json"))
        .unwrap_or_else(|e| panic!("grafana/stallmon.json is not valid JSON: {e}"))
}

/// Every panel, rows' nested panels included.
fn all_panels(d: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p.clone());
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested.iter().cloned());
        }
    }
    out
}

/// stallmon series without job labels: the machine (block layer), stallmon itself, the GPUs'
/// identity. A `job_name` filter on them would select nothing once a job is chosen.
const WITHOUT_JOB_LABELS: &[&str] = &[
    "stallmon_build_info",
    "stallmon_block_io_latency_seconds",
    "stallmon_block_io_queue_seconds",
    "stallmon_block_io_bytes_total",
    "stallmon_block_io_requests_total",
    "stallmon_block_io_job_bytes_total",
    "stallmon_dropped_events_total",
    "stallmon_record_errors_total",
    "stallmon_rank_slots",
    "stallmon_kernel_processes",
    "stallmon_jobs",
    "stallmon_gpu_info",
    "stallmon_gpu_simulated",
];

/// Job series without a `rank` label; every other job or per-GPU series has one.
const WITHOUT_RANK: &[&str] = &["stallmon_target_up"];

/// Series only `--syscalls` (trace or node) exports.
const SYSCALLS_ONLY: &[&str] = &["stallmon_read_latency_seconds", "stallmon_read_bytes_total"];

/// The family a series belongs to (a histogram's `_bucket`, `_sum`, `_count` removed).
fn family(series: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix)
            && prom::HISTOGRAMS.contains(&base)
        {
            return base;
        }
    }
    series
}

#[test]
fn dashboard_is_well_formed() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap_or(0) >= 39);
    assert!(!d["title"].as_str().unwrap_or("").is_empty());
    assert!(!d["uid"].as_str().unwrap_or("").is_empty());

    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("template variable {name} missing"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for name in ["instance", "job_name", "rank", "gpu", "device"] {
        let v = var(name);
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "{name}");
        let def = v["definition"].as_str().unwrap_or("");
        assert!(def.starts_with("label_values("), "{name}: {def}");
        assert!(def.ends_with(&format!(", {name})")), "{name}: {def}");
        assert_eq!(v["query"]["query"], def, "{name}");
        for series in stallmon_series_in(def) {
            assert!(is_stallmon_series(&series), "{name}: {def}");
        }
    }
    // The rank variable lists the ranks of a per-rank series.
    let rank_def = var("rank")["definition"].as_str().unwrap();
    for series in stallmon_series_in(rank_def) {
        let fam = family(&series);
        assert!(
            !WITHOUT_JOB_LABELS.contains(&fam) && !WITHOUT_RANK.contains(&fam),
            "rank: {series} has no rank label: {rank_def}"
        );
    }

    let mut ids = HashSet::new();
    let mut exprs = 0;
    for panel in all_panels(&d) {
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate id: {title}"
        );
        assert!(panel["gridPos"].is_object(), "{title}: no gridPos");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {title} has no targets");
        let mut ref_ids = HashSet::new();
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or("");
            assert!(!expr.is_empty(), "{title}: target without expr");
            assert!(
                ref_ids.insert(t["refId"].as_str().unwrap_or("")),
                "{title}: duplicate refId"
            );
            exprs += 1;
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let sels = selectors(expr);
            assert!(!sels.is_empty(), "{title}: no stallmon metric in {expr}");
            for (metric, matchers) in sels {
                assert!(
                    is_stallmon_series(&metric),
                    "{title}: unknown metric {metric}"
                );
                let fam = family(&metric);
                assert!(
                    matchers.contains(r#"instance=~"$instance""#),
                    "{title}: {metric} is not filtered by node: {expr}"
                );
                if WITHOUT_JOB_LABELS.contains(&fam) {
                    assert!(
                        !matchers.contains("job_name") && !matchers.contains("rank"),
                        "{title}: {metric} has no job labels, yet is filtered by them: {expr}"
                    );
                } else {
                    assert!(
                        matchers.contains(r#"job_name=~"$job_name""#),
                        "{title}: {metric} is not filtered by job: {expr}"
                    );
                    if !WITHOUT_RANK.contains(&fam) {
                        assert!(
                            matchers.contains(r#"rank=~"$rank""#),
                            "{title}: {metric} is not filtered by rank: {expr}"
                        );
                    }
                }
                let has_gpu_label =
                    metric.starts_with("stallmon_gpu_") && metric != "stallmon_gpu_simulated";
                if has_gpu_label {
                    assert!(
                        matchers.contains(r#"gpu=~"$gpu""#),
                        "{title}: {metric} is not filtered by gpu: {expr}"
                    );
                }
                if metric.starts_with("stallmon_block_io_") {
                    assert!(
                        matchers.contains(r#"device=~"$device""#),
                        "{title}: {metric} is not filtered by device: {expr}"
                    );
                }
            }
            if panel["type"] == "heatmap" {
                assert_eq!(t["format"], "heatmap", "{title}");
                assert!(expr.contains("_bucket"), "{title}");
                assert_eq!(t["legendFormat"], "{{le}}", "{title}");
            }
        }
        // Panels that split thread time by state colour every state, cpu_wait included.
        let by_state = targets.iter().any(|t| {
            let e = t["expr"].as_str().unwrap_or("");
            e.contains("stallmon_task_state_seconds_total") && e.contains("state)")
        });
        if by_state {
            let overrides = panel["fieldConfig"]["overrides"].to_string();
            for state in [
                "on_cpu",
                "storage_wait",
                "ipc_wait",
                "other_wait",
                "cpu_wait",
            ] {
                assert!(
                    overrides.contains(state),
                    "{title}: no colour for thread state {state}"
                );
            }
        }
        // A query that needs `--syscalls` is never a panel's only one.
        let syscalls_only = |t: &serde_json::Value| {
            let sels = selectors(t["expr"].as_str().unwrap_or(""));
            sels.iter().all(|(m, _)| SYSCALLS_ONLY.contains(&family(m)))
        };
        if targets.iter().any(syscalls_only) {
            assert!(
                !targets.iter().all(syscalls_only),
                "{title}: shows nothing without --syscalls"
            );
            assert!(
                panel["description"]
                    .as_str()
                    .unwrap_or("")
                    .contains("--syscalls"),
                "{title}: does not say which lines need --syscalls"
            );
        }
    }
    assert!(exprs >= 10, "only {exprs} queries");

    // The panels the operator guide talks about.
    let all = all_panels(&d);
    let find_expr = |needle: &str| {
        all.iter().any(|p| {
            p["targets"].as_array().is_some_and(|ts| {
                ts.iter()
                    .any(|t| t["expr"].as_str().unwrap_or("").contains(needle))
            })
        })
    };
    for needle in [
        "rate(stallmon_gpu_idle_seconds_total",
        "sum by (job_name, rank, cause) (rate(stallmon_gpu_idle_seconds_total",
        "stallmon_gpu_utilization_ratio",
        "stallmon_gpu_info",
        "stallmon_block_io_latency_seconds_bucket",
        "stallmon_read_stall_seconds_bucket",
        "rate(stallmon_task_read_bytes_total",
        "rate(stallmon_task_state_seconds_total",
        "rate(stallmon_job_block_io_bytes_total",
        "stallmon_tracked_processes",
        "stallmon_dropped_events_total",
        "stallmon_build_info",
    ] {
        assert!(find_expr(needle), "no panel queries {needle}");
    }
    assert!(
        all.iter().any(|p| p["type"] == "heatmap"),
        "no heatmap panel"
    );
}

/// Every dashboard query parses as PromQL (checked by promtool as a recording
/// rule, with Grafana's variables replaced by values).
#[test]
fn dashboard_queries_are_valid_promql() {
    let d = dashboard();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for panel in all_panels(&d) {
        for t in panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$__range", "1h")
                .replace("$__interval", "15s")
                .replace("$instance", ".*")
                .replace("$job_name", ".*")
                .replace("$rank", ".*")
                .replace("$gpu", ".*")
                .replace("$device", ".*");
            assert!(!expr.contains('$'), "unreplaced variable in {expr}");
            n += 1;
            rules.push_str(&format!(
                "      - record: dashboard:query{n}:check\n        expr: {}\n",
                serde_json::to_string(&expr).unwrap()
            ));
        }
    }
    let dir = std::env::temp_dir().join(format!("stallmon-dash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("dashboard_rules.yml");
    std::fs::write(&file, rules).unwrap();
    let result = prom::promtool(&dir, &["check", "rules", "dashboard_rules.yml"]);
    let _ = std::fs::remove_dir_all(&dir);
    let out = result.unwrap_or_else(|e| panic!("{e:#}"));
    assert!(out.contains(&format!("SUCCESS: {n} rules found")), "{out}");
}

// ------------------------------------------------------------------ Zabbix

const ZABBIX_PREPROCESSING: &[&str] = &[
    "PROMETHEUS_PATTERN",
    "PROMETHEUS_TO_JSON",
    "CHANGE_PER_SECOND",
    "SIMPLE_CHANGE",
    "MULTIPLIER",
    "DISCARD_UNCHANGED_HEARTBEAT",
    "DISCARD_UNCHANGED",
    "JAVASCRIPT",
    "JSONPATH",
];

/// Item keys referenced as `/host/key` (history functions) in a trigger
/// expression or calculated item formula: (host, key).
fn referenced_keys(expr: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(pos) = rest.find("(/") {
        let after = &rest[pos + 2..];
        let Some(slash) = after.find('/') else { break };
        let host = after[..slash].to_string();
        let key_part = &after[slash + 1..];
        let mut depth = 0i32;
        let mut end = key_part.len();
        let mut in_quote = false;
        for (i, c) in key_part.char_indices() {
            match c {
                '"' => in_quote = !in_quote,
                '[' if !in_quote => depth += 1,
                ']' if !in_quote => depth -= 1,
                ',' | ')' if !in_quote && depth == 0 => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        out.push((host, key_part[..end].to_string()));
        rest = &key_part[end..];
    }
    out
}

/// User macros `{$NAME}` / `{$NAME:"context"}` in a string.
fn user_macros(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(pos) = rest.find("{$") {
        let Some(end) = rest[pos..].find('}') else {
            break;
        };
        out.push(rest[pos..pos + end + 1].to_string());
        rest = &rest[pos + end + 1..];
    }
    out
}

fn collect_uuids(v: &Yaml, out: &mut Vec<String>) {
    match v {
        Yaml::Mapping(m) => {
            for (k, val) in m {
                if k.as_str() == Some("uuid") {
                    out.push(val.as_str().unwrap_or("<not a string>").to_string());
                }
                collect_uuids(val, out);
            }
        }
        Yaml::Sequence(s) => s.iter().for_each(|x| collect_uuids(x, out)),
        _ => {}
    }
}

fn collect_strings(v: &Yaml, out: &mut Vec<String>) {
    match v {
        Yaml::String(s) => out.push(s.clone()),
        Yaml::Mapping(m) => m.iter().for_each(|(_, x)| collect_strings(x, out)),
        Yaml::Sequence(s) => s.iter().for_each(|x| collect_strings(x, out)),
        _ => {}
    }
}

#[test]
fn zabbix_template_is_consistent() {
    let doc = yaml("zabbix/stallmon_template.yaml");
    let export = &doc["zabbix_export"];
    // The export format of Zabbix 6.0 LTS (Debian 12's zabbix-server-pgsql), which
    // tests/tests/zabbix.rs imports into a real server; 6.0 declares template groups under
    // `groups` (`template_groups` came with 6.2).
    assert_eq!(export["version"].as_str(), Some("6.0"));
    assert!(!seq(&export["groups"]).is_empty(), "no groups");
    let template = &export["templates"][0];
    let tname = str_of(template, "template");
    assert!(!tname.is_empty());
    let group_names: HashSet<&str> = seq(&export["groups"])
        .iter()
        .map(|g| str_of(g, "name"))
        .collect();
    for g in seq(&template["groups"]) {
        assert!(
            group_names.contains(str_of(g, "name")),
            "undeclared group {g:?}"
        );
    }

    let items = seq(&template["items"]);
    let rules = seq(&template["discovery_rules"]);
    let prototypes: Vec<&Yaml> = rules
        .iter()
        .flat_map(|r| seq(&r["item_prototypes"]))
        .collect();

    // Master item: HTTP agent on /metrics.
    let master = items
        .iter()
        .find(|i| str_of(i, "type") == "HTTP_AGENT")
        .expect("no HTTP_AGENT item");
    let url = str_of(master, "url");
    assert!(url.contains("/metrics"), "{url}");
    assert!(
        url.contains("{HOST.CONN}") && url.contains("{$STALLMON.PORT}"),
        "{url}"
    );
    assert_eq!(str_of(master, "value_type"), "TEXT");
    assert_eq!(str_of(master, "history"), "0");
    let master_key = str_of(master, "key");

    let item_keys: HashSet<&str> = items.iter().map(|i| str_of(i, "key")).collect();
    let proto_keys: HashSet<&str> = prototypes.iter().map(|i| str_of(i, "key")).collect();
    assert_eq!(item_keys.len(), items.len(), "duplicate item keys");
    assert_eq!(
        proto_keys.len(),
        prototypes.len(),
        "duplicate prototype keys"
    );
    for k in &proto_keys {
        assert!(k.contains("{#"), "prototype key {k} has no LLD macro");
    }

    // Dependent items, prototypes and discovery rules hang off existing items;
    // preprocessing steps are of known types and read known metrics.
    let mut uses_pattern = 0;
    let mut uses_to_json = 0;
    let all_entities: Vec<(&str, &Yaml)> = items
        .iter()
        .map(|i| ("item", i))
        .chain(prototypes.iter().map(|p| ("prototype", *p)))
        .chain(rules.iter().map(|r| ("discovery rule", r)))
        .collect();
    for (kind, e) in &all_entities {
        let key = str_of(e, "key");
        assert!(!key.is_empty(), "{kind} without key");
        if str_of(e, "type") == "DEPENDENT" {
            let mk = str_of(&e["master_item"], "key");
            let exists =
                item_keys.contains(mk) || (*kind == "prototype" && proto_keys.contains(mk));
            assert!(exists, "{kind} {key}: master item {mk:?} does not exist");
        }
        for step in seq(&e["preprocessing"]) {
            let ty = str_of(step, "type");
            assert!(
                ZABBIX_PREPROCESSING.contains(&ty),
                "{kind} {key}: preprocessing {ty}"
            );
            if ty == "PROMETHEUS_PATTERN" || ty == "PROMETHEUS_TO_JSON" {
                let pattern = seq(&step["parameters"])
                    .first()
                    .and_then(Yaml::as_str)
                    .unwrap_or("");
                let metric: String = pattern
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                assert!(
                    is_stallmon_series(&metric),
                    "{kind} {key}: {ty} reads unknown metric {metric:?} ({pattern})"
                );
                if ty == "PROMETHEUS_PATTERN" {
                    uses_pattern += 1;
                    let params = seq(&step["parameters"]);
                    assert_eq!(
                        params.len(),
                        3,
                        "{kind} {key}: PROMETHEUS_PATTERN takes 3 parameters"
                    );
                    let mode = params[1].as_str().unwrap_or("");
                    // `value` and `label` fail when several series match, which happens as
                    // soon as a series gains a label the pattern does not name (rank, UUID,
                    // pod, ...): every pattern aggregates instead.
                    assert_eq!(
                        mode, "function",
                        "{kind} {key}: PROMETHEUS_PATTERN must aggregate (function), not {mode:?}"
                    );
                    let func = params[2].as_str().unwrap_or("");
                    assert!(["sum", "max", "min"].contains(&func), "{key}: {func}");
                } else {
                    uses_to_json += 1;
                }
            }
        }
    }
    assert!(uses_pattern >= 5 && uses_to_json >= 2);
    for rule in rules {
        assert_eq!(str_of(rule, "type"), "DEPENDENT");
        assert_eq!(str_of(&rule["master_item"], "key"), master_key);
        assert!(
            seq(&rule["preprocessing"])
                .iter()
                .any(|s| str_of(s, "type") == "PROMETHEUS_TO_JSON"),
            "discovery rule {} does not use PROMETHEUS_TO_JSON",
            str_of(rule, "key")
        );
        assert!(!seq(&rule["lld_macro_paths"]).is_empty());
    }
    let rule_sources: Vec<&str> = rules
        .iter()
        .flat_map(|r| seq(&r["preprocessing"]))
        .filter(|s| str_of(s, "type") == "PROMETHEUS_TO_JSON")
        .filter_map(|s| seq(&s["parameters"]).first().and_then(Yaml::as_str))
        .collect();
    assert!(
        rule_sources.contains(&"stallmon_gpu_utilization_ratio"),
        "{rule_sources:?}"
    );
    assert!(
        rule_sources.contains(&"stallmon_block_io_requests_total"),
        "{rule_sources:?}"
    );
    // Ranks are discovered from a series that has a rank label (stallmon_target_up has none).
    assert!(
        rule_sources.contains(&"stallmon_tracked_processes"),
        "no rank discovery: {rule_sources:?}"
    );
    assert!(
        !rule_sources.iter().any(|s| WITHOUT_RANK.contains(s)),
        "a discovery rule reads ranks from a series without them: {rule_sources:?}"
    );
    // Each rule turns the series into one row per discovered value (JavaScript step), so that
    // series differing only in labels it does not use give one row, not duplicate keys.
    for rule in rules {
        assert!(
            seq(&rule["preprocessing"])
                .iter()
                .any(|s| str_of(s, "type") == "JAVASCRIPT"),
            "discovery rule {} does not deduplicate its rows",
            str_of(rule, "key")
        );
    }

    // UUIDs: 32 lower-case hex digits in UUIDv4 layout (what Zabbix import
    // checks), all different.
    let mut uuids = Vec::new();
    collect_uuids(&doc, &mut uuids);
    assert!(uuids.len() > 20);
    let mut seen = HashSet::new();
    for u in &uuids {
        assert!(
            u.len() == 32
                && u.chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
            "bad uuid {u:?}"
        );
        assert!(
            u.as_bytes()[12] == b'4' && b"89ab".contains(&u.as_bytes()[16]),
            "not UUIDv4: {u}"
        );
        assert!(seen.insert(u.clone()), "duplicate uuid {u}");
    }

    // Triggers reference existing items (prototypes only from trigger prototypes).
    let mut triggers: Vec<(&str, &str)> = Vec::new(); // (expression, scope)
    for item in items {
        for t in seq(&item["triggers"]) {
            triggers.push((str_of(t, "expression"), "item"));
        }
    }
    for t in seq(&export["triggers"]) {
        triggers.push((str_of(t, "expression"), "item"));
    }
    for rule in rules {
        for t in seq(&rule["trigger_prototypes"]) {
            triggers.push((str_of(t, "expression"), "prototype"));
        }
    }
    let mut trigger_keys = HashSet::new();
    for (expr, scope) in &triggers {
        let refs = referenced_keys(expr);
        assert!(!refs.is_empty(), "trigger references no item: {expr}");
        for (host, key) in refs {
            assert_eq!(host, tname, "{expr}");
            let ok = item_keys.contains(key.as_str())
                || (*scope == "prototype" && proto_keys.contains(key.as_str()));
            assert!(ok, "trigger references unknown key {key}: {expr}");
            trigger_keys.insert(key);
        }
    }
    // The triggers matching the Prometheus alerts.
    let exprs: Vec<&str> = triggers.iter().map(|(e, _)| *e).collect();
    assert!(
        exprs.iter().any(|e| e.starts_with("nodata(")),
        "no nodata trigger"
    );
    assert!(
        trigger_keys
            .iter()
            .any(|k| k.starts_with("stallmon.dropped_events"))
    );
    assert!(
        trigger_keys
            .iter()
            .any(|k| k.starts_with("stallmon.gpu.stale["))
    );
    assert!(trigger_keys.iter().any(|k| k.ends_with(",io]")));
    assert!(trigger_keys.iter().any(|k| k.ends_with(",preprocess]")));

    // Calculated prototypes reference existing prototypes.
    for p in &prototypes {
        if str_of(p, "type") == "CALCULATED" {
            let formula = str_of(p, "params");
            let refs = referenced_keys(formula);
            assert!(!refs.is_empty(), "{formula}");
            for (host, key) in refs {
                assert!(host.is_empty(), "{formula}");
                assert!(
                    proto_keys.contains(key.as_str()),
                    "formula references {key}"
                );
            }
        }
    }
    // Graph prototypes draw existing prototypes.
    for rule in rules {
        for g in seq(&rule["graph_prototypes"]) {
            for gi in seq(&g["graph_items"]) {
                assert_eq!(str_of(&gi["item"], "host"), tname);
                let key = str_of(&gi["item"], "key");
                assert!(proto_keys.contains(key), "graph item {key}");
            }
        }
    }
    // Value maps used are defined.
    let valuemaps: HashSet<&str> = seq(&template["valuemaps"])
        .iter()
        .map(|v| str_of(v, "name"))
        .collect();
    for (_, e) in &all_entities {
        if let Some(name) = e["valuemap"]["name"].as_str() {
            assert!(valuemaps.contains(name), "undefined value map {name}");
        }
    }
    // User macros used anywhere are defined (a context macro falls back to the
    // macro without context).
    let defined: HashSet<&str> = seq(&template["macros"])
        .iter()
        .map(|m| str_of(m, "macro"))
        .collect();
    let mut strings = Vec::new();
    collect_strings(template, &mut strings);
    for s in &strings {
        for m in user_macros(s) {
            let base = match m.split_once(':') {
                Some((b, _)) => format!("{b}}}"),
                None => m.clone(),
            };
            assert!(
                defined.contains(m.as_str()) || defined.contains(base.as_str()),
                "undefined macro {m} in {s:?}"
            );
        }
    }
}

#[test]
fn zabbix_reference_parsing() {
    assert_eq!(
        referenced_keys("avg(/T/a.b[{#GPU},all],10m)>1 and last(/T/c)=0"),
        vec![
            ("T".to_string(), "a.b[{#GPU},all]".to_string()),
            ("T".to_string(), "c".to_string())
        ]
    );
    assert_eq!(
        referenced_keys("last(//x[1,2])/(last(//y)+1)"),
        vec![
            (String::new(), "x[1,2]".to_string()),
            (String::new(), "y".to_string())
        ]
    );
    assert_eq!(
        user_macros("a {$X} b {$Y:\"read\"}"),
        vec!["{$X}", "{$Y:\"read\"}"]
    );
}

// ------------------------------------------------------------------ systemd

#[test]
fn systemd_unit_is_hardened() {
    let text = read("systemd/stallmon.service");
    let mut section = String::new();
    let mut service: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut sections = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_string();
            sections.insert(section.clone());
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        if section == "[Service]" {
            service
                .entry(k.to_string())
                .or_default()
                .push(v.to_string());
        }
    }
    assert_eq!(
        sections,
        BTreeSet::from(["[Install]".into(), "[Service]".into(), "[Unit]".into()])
    );
    let one = |k: &str| -> &str {
        let v = service.get(k).unwrap_or_else(|| panic!("{k} missing"));
        assert_eq!(v.len(), 1, "{k} set more than once");
        &v[0]
    };
    // The node agent, configured by STALLMON_* variables, ready and watched through sd_notify.
    assert_eq!(one("ExecStart"), "/usr/local/bin/stallmon node");
    assert_eq!(one("EnvironmentFile"), "-/etc/default/stallmon");
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    assert!(one("WatchdogSec").ends_with('s'));
    assert!(one("LimitNOFILE").parse::<u64>().unwrap() >= 4096);
    let wanted: BTreeSet<&str> = [
        "CAP_BPF",
        "CAP_PERFMON",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_PTRACE",
        "CAP_DAC_READ_SEARCH",
    ]
    .into();
    for k in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let caps: BTreeSet<&str> = one(k).split_whitespace().collect();
        assert_eq!(caps, wanted, "{k}");
    }
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ReadWritePaths", "/var/lib/stallmon"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(one(k), v, "{k}");
    }
    // These would hide /dev/nvidia* (ProtectClock implies a device allow-list)
    // or the job's processes.
    for forbidden in [
        "PrivateDevices",
        "DeviceAllow",
        "ProtectClock",
        "ProtectProc",
        "User",
    ] {
        assert!(
            !service.contains_key(forbidden),
            "{forbidden} would break stallmon"
        );
    }
    // Each capability is explained in a comment.
    for cap in &wanted {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with('#') && l.contains(cap)),
            "{cap} not explained"
        );
    }
}

// ------------------------------------------------------------------ Kubernetes

#[test]
fn kubernetes_manifests() {
    let text = read("kubernetes/daemonset.yaml");
    // Documents are separated by lines of "---".
    let mut docs: Vec<Yaml> = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            let doc: Yaml = serde_yaml::from_str(&current)
                .unwrap_or_else(|e| panic!("invalid YAML document: {e}\n{current}"));
            if !doc.is_null() {
                docs.push(doc);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    assert_eq!(docs.len(), 6, "expected 6 documents");
    let by_kind = |kind: &str| -> &Yaml {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} document"))
    };
    assert_eq!(by_kind("Namespace")["metadata"]["name"], "monitoring");
    for d in &docs {
        if d["kind"] != "Namespace" {
            assert_eq!(d["metadata"]["namespace"], "monitoring", "{:?}", d["kind"]);
        }
    }

    let ds = by_kind("DaemonSet");
    assert_eq!(ds["apiVersion"], "apps/v1");
    let pod = &ds["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        labels["app.kubernetes.io/name"]
    );
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "19435");
    let spec = &pod["spec"];
    assert_eq!(spec["hostPID"], true);
    assert_eq!(spec["runtimeClassName"], "nvidia");
    let c = &spec["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    let add: Vec<&str> = seq(&sc["capabilities"]["add"])
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(
        add,
        [
            "BPF",
            "PERFMON",
            "SYS_RESOURCE",
            "SYS_PTRACE",
            "DAC_READ_SEARCH"
        ]
    );
    let drop: Vec<&str> = seq(&sc["capabilities"]["drop"])
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(drop, ["ALL"]);
    let env: BTreeMap<&str, &str> = seq(&c["env"])
        .iter()
        .map(|e| (str_of(e, "name"), str_of(e, "value")))
        .collect();
    assert_eq!(env.get("NVIDIA_VISIBLE_DEVICES"), Some(&"all"));
    assert_eq!(env.get("NVIDIA_DRIVER_CAPABILITIES"), Some(&"utility"));
    // The node agent, configured through its environment variables.
    let command_line: String = seq(&c["command"])
        .iter()
        .chain(seq(&c["args"]))
        .filter_map(Yaml::as_str)
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(command_line, "/usr/local/bin/stallmon node");
    assert_eq!(env.get("STALLMON_LISTEN"), Some(&"0.0.0.0:19435"));
    assert_eq!(
        env.get("STALLMON_POD_RESOURCES_SOCKET"),
        Some(&"/var/lib/kubelet/pod-resources/kubelet.sock")
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{probe}");
    }
    assert_eq!(c["ports"][0]["containerPort"], 19435);
    let mounts: BTreeMap<&str, &Yaml> = seq(&c["volumeMounts"])
        .iter()
        .map(|m| (str_of(m, "mountPath"), m))
        .collect();
    for path in [
        "/sys/kernel/btf",
        "/sys/kernel/tracing",
        "/var/lib/kubelet/pod-resources",
    ] {
        let m = mounts
            .get(path)
            .unwrap_or_else(|| panic!("{path} not mounted"));
        assert_eq!(m["readOnly"], true, "{path}");
        let vol = seq(&spec["volumes"])
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("volume for {path}"));
        assert_eq!(vol["hostPath"]["path"], path);
    }

    let svc = by_kind("Service");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["spec"]["ports"][0]["port"], 19435);
    assert_eq!(
        svc["spec"]["selector"]["app.kubernetes.io/name"],
        labels["app.kubernetes.io/name"]
    );

    let sm = by_kind("ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        svc["metadata"]["labels"]["app.kubernetes.io/name"]
    );
    assert_eq!(
        sm["spec"]["endpoints"][0]["port"],
        svc["spec"]["ports"][0]["name"]
    );
    // The job label comes from the Service name; StallmonDown expects "stallmon".
    assert_eq!(svc["metadata"]["name"], "stallmon");
    // The training job's pod labels stay pod/namespace/container, not exported_*.
    assert_eq!(sm["spec"]["endpoints"][0]["honorLabels"], true);
    // ...and stallmon's own pod labels do not land on the machine-wide series.
    let drops = sm["spec"]["endpoints"][0]["relabelings"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter(|r| r["action"] == "labeldrop")
        .filter_map(|r| r["regex"].as_str())
        .map(|re| regex::Regex::new(&format!("^(?:{re})$")).unwrap())
        .collect::<Vec<_>>();
    for label in ["pod", "namespace", "container"] {
        assert!(
            drops.iter().any(|re| re.is_match(label)),
            "the ServiceMonitor keeps the target's {label} label"
        );
    }
    for label in ["instance", "job"] {
        assert!(
            !drops.iter().any(|re| re.is_match(label)),
            "{label} dropped"
        );
    }
}

// ------------------------------------------------------------------ operator guide

#[test]
fn operator_guide_covers_every_alert() {
    let path = integrations_dir().join("../operator-guide.md");
    let guide = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    for rule in alert_rules() {
        let name = str_of(&rule, "alert");
        assert!(
            guide
                .lines()
                .any(|l| l.starts_with('#') && l.contains(name)),
            "operator-guide.md has no section for {name}"
        );
    }
    for needle in [
        "stallmon check",
        "cargo xtask build",
        "kube-rbac-proxy",
        "127.0.0.1:19435",
    ] {
        assert!(
            guide.contains(needle),
            "operator-guide.md does not mention {needle}"
        );
    }
}

// ------------------------------------------------------------------ metrics reference

/// docs/metrics.md lists every family stallmon exports (each as `` `name` ``), and names no
/// stallmon series that does not exist (recording-rule names, `level:metric:operations`, aside).
#[test]
fn metrics_reference_lists_every_family() {
    let path = integrations_dir().join("../metrics.md");
    let doc = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let missing: Vec<&str> = prom::STALLMON_METRICS
        .iter()
        .copied()
        .filter(|name| !doc.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics.md does not list these families (as `name`): {missing:?}"
    );
    let unknown: BTreeSet<&str> = doc
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .map(|t| t.trim_end_matches(':'))
        .filter(|t| t.starts_with("stallmon_") && !t.contains(':'))
        .filter(|t| !is_stallmon_series(t))
        .collect();
    assert!(
        unknown.is_empty(),
        "metrics.md names series stallmon does not export: {unknown:?}"
    );
}
