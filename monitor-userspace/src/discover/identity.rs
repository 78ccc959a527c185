//! What a job's processes say about themselves: rank variables and job ids in the environment,
//! Kubernetes pod and SLURM job in the cgroup path. All of it is written by the job's user and
//! is hostile input: only the few variables below are extracted (nothing else of an environment
//! is kept or logged: it may hold secrets), every value is bounded and stripped of control
//! characters before it becomes a label or a log field ([`sanitize`]).
//!
//! The parsing is split into pure functions over file contents, tested without processes.

use crate::schema::JobLabels;

/// Longest label value kept (longer values are cut).
pub const MAX_LABEL: usize = 128;

/// A label value made safe for Prometheus, logs and JSON: control characters (newlines, escape
/// sequences) and other non-printing characters become `_`, the length is bounded.
pub fn sanitize(raw: &str) -> String {
    raw.trim()
        .chars()
        .take(MAX_LABEL)
        .map(|c| {
            if c.is_control() || c == '\u{fffd}' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// A rank as the launcher told it to the process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RankVars {
    /// Global rank.
    pub rank: Option<u32>,
    /// Rank within the node (the GPU it usually drives).
    pub local_rank: Option<u32>,
    /// Which launcher convention named it (`RANK`, `SLURM_PROCID`, ...).
    pub source: &'static str,
}

impl RankVars {
    /// The `rank` label: the global rank, else the local one.
    pub fn label(&self) -> Option<String> {
        self.rank.or(self.local_rank).map(|r| r.to_string())
    }
}

/// What stallmon reads from a process's environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvFacts {
    pub rank: Option<RankVars>,
    pub slurm_job_id: Option<String>,
    pub elastic_run_id: Option<String>,
}

/// Rank variable pairs (global, local) by launcher, in order of preference.
const RANK_VARS: [(&str, &str, &str); 4] = [
    ("RANK", "LOCAL_RANK", "RANK"),
    (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_RANK",
    ),
    ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_PROCID"),
    ("PMI_RANK", "MPI_LOCALRANKID", "PMI_RANK"),
];

/// Extracts [`EnvFacts`] from the contents of `/proc/PID/environ` (`NAME=value` entries
/// separated by NUL bytes). Everything else in it is ignored.
pub fn env_facts(raw: &[u8]) -> EnvFacts {
    let get = |name: &str| -> Option<String> {
        raw.split(|b| *b == 0).find_map(|entry| {
            let rest = entry.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
            let v = String::from_utf8_lossy(rest);
            let v = sanitize(&v);
            (!v.is_empty()).then_some(v)
        })
    };
    let number = |v: Option<String>| v.and_then(|v| v.parse::<u32>().ok());
    let mut rank = None;
    for (global, local, source) in RANK_VARS {
        let (g, l) = (number(get(global)), number(get(local)));
        if g.is_some() || l.is_some() {
            rank = Some(RankVars {
                rank: g,
                local_rank: l,
                source,
            });
            break;
        }
    }
    // torchrun sets the run id to "none" when no --rdzv-id was given: not a name.
    let elastic_run_id = get("TORCHELASTIC_RUN_ID").filter(|v| !v.eq_ignore_ascii_case("none"));
    EnvFacts {
        rank,
        slurm_job_id: get("SLURM_JOB_ID"),
        elastic_run_id,
    }
}

/// What the cgroup path says about where a process runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupFacts {
    /// Kubernetes pod UID (lower case, with dashes).
    pub pod_uid: Option<String>,
    /// Container id (the runtime's scope or directory name), within the pod.
    pub container_id: Option<String>,
    /// SLURM job id (`.../job_<id>/...`).
    pub slurm_job: Option<String>,
    /// The path itself (of the unified or first hierarchy), sanitized, for grouping.
    pub path: String,
}

/// Parses the contents of `/proc/PID/cgroup` (both cgroup drivers, v1 and v2).
///
/// - Kubernetes, cgroupfs: `.../kubepods/burstable/pod0f3c...-.../<container>`
/// - Kubernetes, systemd: `.../kubepods-burstable-pod0f3c..._....slice/cri-containerd-<id>.scope`
///   (the UID's dashes are written as underscores)
/// - SLURM: `.../slurm/uid_1000/job_42/step_0/...` or `.../slurmstepd.scope/job_42/...`
pub fn cgroup_facts(content: &str) -> CgroupFacts {
    let mut out = CgroupFacts::default();
    for line in content.lines() {
        // hierarchy-ID:controllers:path; the path may itself contain ':'.
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        if out.path.is_empty() || line.starts_with("0::") {
            out.path = sanitize(path);
        }
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if path.contains("kubepods")
            && let Some(i) = segments
                .iter()
                .position(|s| pod_uid_of_segment(s).is_some())
        {
            out.pod_uid = pod_uid_of_segment(segments[i]);
            out.container_id = segments.get(i + 1).map(|c| sanitize(container_id_of(c)));
        }
        if out.slurm_job.is_none()
            && let Some(id) = segments
                .iter()
                .find_map(|s| s.strip_prefix("job_"))
                .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()))
        {
            out.slurm_job = Some(id.to_string());
        }
    }
    out
}

/// `cri-containerd-<id>.scope` → `<id>`; a cgroupfs directory name is the id itself.
fn container_id_of(segment: &str) -> &str {
    let s = segment.strip_suffix(".scope").unwrap_or(segment);
    s.rsplit_once('-').map_or(s, |(_, id)| id)
}

/// The pod UID in one cgroup path segment (`pod<uid>` or `kubepods-<qos>-pod<uid>.slice`).
fn pod_uid_of_segment(segment: &str) -> Option<String> {
    let segment = segment.strip_suffix(".slice").unwrap_or(segment);
    let start = segment.rfind("pod")? + "pod".len();
    let uid: String = segment[start..]
        .chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    let hex_digits = uid.chars().filter(char::is_ascii_hexdigit).count();
    let only_uid_chars = uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    (only_uid_chars && hex_digits == 32).then_some(uid)
}

/// A pod as the kubelet's pod-resources API names it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodRef {
    pub pod: String,
    pub namespace: String,
    pub container: String,
}

/// The job's labels: `--job-name` wins, then the elastic run id, then the root's command name;
/// pod, namespace and container from the pod-resources API when it knows the job's GPUs, else
/// the pod UID from the cgroup; the SLURM job from the cgroup path, else the environment.
pub fn job_labels(
    explicit: Option<&str>,
    env: &EnvFacts,
    cg: &CgroupFacts,
    pod: Option<&PodRef>,
    comm: &str,
) -> JobLabels {
    let job_name = explicit
        .map(sanitize)
        .filter(|n| !n.is_empty())
        .or_else(|| env.elastic_run_id.clone())
        .unwrap_or_else(|| sanitize(comm));
    let (pod, namespace, container) = match pod {
        Some(p) => (
            sanitize(&p.pod),
            sanitize(&p.namespace),
            sanitize(&p.container),
        ),
        None => (
            cg.pod_uid.clone().unwrap_or_default(),
            String::new(),
            String::new(),
        ),
    };
    JobLabels {
        job_name,
        pod,
        namespace,
        container,
        hpc_job: cg
            .slurm_job
            .clone()
            .or_else(|| env.slurm_job_id.clone())
            .unwrap_or_default(),
    }
}

/// What groups processes into one job in node mode, in order of preference.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobKey {
    /// Kubernetes pod UID and container.
    Container(String, String),
    /// SLURM job id.
    Slurm(String),
    /// TorchElastic run id.
    Elastic(String),
    /// The process-tree root (pid, start time in ticks).
    Root(u32, u64),
}

/// The grouping key of a process from what it says about itself (`None`: use its tree root).
pub fn job_key(env: &EnvFacts, cg: &CgroupFacts) -> Option<JobKey> {
    if let Some(uid) = &cg.pod_uid {
        return Some(JobKey::Container(
            uid.clone(),
            cg.container_id.clone().unwrap_or_default(),
        ));
    }
    if let Some(id) = cg.slurm_job.clone().or_else(|| env.slurm_job_id.clone()) {
        return Some(JobKey::Slurm(id));
    }
    env.elastic_run_id.clone().map(JobKey::Elastic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_variables_of_each_launcher() {
        let f = env_facts(b"PATH=/bin\0RANK=3\0LOCAL_RANK=1\0WORLD_SIZE=8\0");
        let r = f.rank.unwrap();
        assert_eq!((r.rank, r.local_rank, r.source), (Some(3), Some(1), "RANK"));
        assert_eq!(r.label().as_deref(), Some("3"));
        let r = env_facts(b"SLURM_PROCID=5\0SLURM_LOCALID=1\0SLURM_JOB_ID=991\0")
            .rank
            .unwrap();
        assert_eq!((r.rank, r.source), (Some(5), "SLURM_PROCID"));
        let r = env_facts(b"OMPI_COMM_WORLD_RANK=2\0OMPI_COMM_WORLD_LOCAL_RANK=0\0")
            .rank
            .unwrap();
        assert_eq!((r.rank, r.local_rank), (Some(2), Some(0)));
        assert_eq!(env_facts(b"PMI_RANK=7\0").rank.unwrap().rank, Some(7));
        // torchrun sets RANK as well as SLURM_PROCID under srun: RANK wins.
        let r = env_facts(b"SLURM_PROCID=0\0RANK=4\0").rank.unwrap();
        assert_eq!(r.rank, Some(4));
        // Only LOCAL_RANK: the label is the local rank.
        assert_eq!(
            env_facts(b"LOCAL_RANK=2\0")
                .rank
                .unwrap()
                .label()
                .as_deref(),
            Some("2")
        );
        // Not numbers: no rank.
        assert_eq!(env_facts(b"RANK=abc\0").rank, None);
        assert_eq!(env_facts(b"").rank, None);
        // A prefix is not the variable.
        assert_eq!(env_facts(b"RANKING=1\0XRANK=2\0").rank, None);
    }

    #[test]
    fn job_ids_from_the_environment() {
        let f = env_facts(b"TORCHELASTIC_RUN_ID=ft-run\0SLURM_JOB_ID=991\0");
        assert_eq!(f.elastic_run_id.as_deref(), Some("ft-run"));
        assert_eq!(f.slurm_job_id.as_deref(), Some("991"));
        assert_eq!(
            env_facts(b"TORCHELASTIC_RUN_ID=none\0").elastic_run_id,
            None
        );
        assert_eq!(env_facts(b"SLURM_JOB_ID=  \0").slurm_job_id, None);
        // Invalid UTF-8 is replaced, then sanitized.
        let f = env_facts(b"SLURM_JOB_ID=4\xff2\0");
        assert_eq!(f.slurm_job_id.as_deref(), Some("4_2"));
    }

    #[test]
    fn hostile_values_are_sanitized() {
        // A job id with a newline would forge log lines; with an escape sequence, a terminal.
        let f = env_facts(b"SLURM_JOB_ID=42\nstallmon: error: forged\0");
        let v = f.slurm_job_id.unwrap();
        assert!(!v.contains('\n'), "{v:?}");
        assert_eq!(v, "42_stallmon: error: forged");
        assert_eq!(sanitize("a\u{1b}[31mb\r"), "a_[31mb");
        let long = "x".repeat(10_000);
        assert_eq!(sanitize(&long).len(), MAX_LABEL);
        let labels = job_labels(
            Some("job\u{7}\n"),
            &EnvFacts::default(),
            &CgroupFacts::default(),
            None,
            "py",
        );
        assert_eq!(labels.job_name, "job_");
    }

    #[test]
    fn cgroup_paths_of_kubernetes_and_slurm() {
        let cg = cgroup_facts(
            "0::/kubepods/burstable/pod0f3c1d2e-4a5b-6c7d-8e9f-0a1b2c3d4e5f/3b1a9c0e8d\n",
        );
        assert_eq!(
            cg.pod_uid.as_deref(),
            Some("0f3c1d2e-4a5b-6c7d-8e9f-0a1b2c3d4e5f")
        );
        assert_eq!(cg.container_id.as_deref(), Some("3b1a9c0e8d"));
        let cg = cgroup_facts(
            "0::/kubepods.slice/kubepods-besteffort.slice/\
             kubepods-besteffort-pod0F3C1D2E_4A5B_6C7D_8E9F_0A1B2C3D4E5F.slice/\
             cri-containerd-7a1e0c9b.scope\n",
        );
        assert_eq!(
            cg.pod_uid.as_deref(),
            Some("0f3c1d2e-4a5b-6c7d-8e9f-0a1b2c3d4e5f")
        );
        assert_eq!(cg.container_id.as_deref(), Some("7a1e0c9b"));
        let cg = cgroup_facts(
            "12:pids:/kubepods/pod11111111-2222-3333-4444-555555555555/abc\n\
             1:name=systemd:/kubepods/pod11111111-2222-3333-4444-555555555555/abc\n",
        );
        assert_eq!(
            cg.pod_uid.as_deref(),
            Some("11111111-2222-3333-4444-555555555555")
        );
        let cg = cgroup_facts("0::/system.slice/slurmstepd.scope/job_42/step_0/user/task_0\n");
        assert_eq!(cg.slurm_job.as_deref(), Some("42"));
        assert_eq!(cg.pod_uid, None);
        let cg = cgroup_facts("4:memory:/slurm/uid_1000/job_1234/step_batch\n");
        assert_eq!(cg.slurm_job.as_deref(), Some("1234"));
        for plain in [
            "0::/user.slice/user-1000.slice/session-3.scope\n",
            "0::/system.slice/podman-1234.scope\n",
            "0::/kubepods/burstable/podnotauid/abc\n",
            "0::/system.slice/job_/x\n",
            "",
        ] {
            let cg = cgroup_facts(plain);
            assert_eq!((cg.pod_uid, cg.slurm_job), (None, None), "{plain}");
        }
    }

    #[test]
    fn labels_and_keys() {
        let env = env_facts(b"TORCHELASTIC_RUN_ID=run7\0SLURM_JOB_ID=991\0");
        let cg = CgroupFacts::default();
        let l = job_labels(None, &env, &cg, None, "python3");
        assert_eq!((l.job_name.as_str(), l.hpc_job.as_str()), ("run7", "991"));
        assert_eq!(
            job_labels(Some(" resnet "), &env, &cg, None, "p").job_name,
            "resnet"
        );
        assert_eq!(
            job_labels(Some(""), &EnvFacts::default(), &cg, None, "p").job_name,
            "p"
        );
        let cg = cgroup_facts("0::/kubepods/pod11111111-2222-3333-4444-555555555555/c0ffee\n");
        let l = job_labels(None, &EnvFacts::default(), &cg, None, "python3");
        assert_eq!(l.pod, "11111111-2222-3333-4444-555555555555");
        let pod = PodRef {
            pod: "trainer-0".into(),
            namespace: "ml".into(),
            container: "main".into(),
        };
        let l = job_labels(None, &EnvFacts::default(), &cg, Some(&pod), "python3");
        assert_eq!(
            (l.pod.as_str(), l.namespace.as_str(), l.container.as_str()),
            ("trainer-0", "ml", "main")
        );
        assert_eq!(
            job_key(&EnvFacts::default(), &cg),
            Some(JobKey::Container(
                "11111111-2222-3333-4444-555555555555".into(),
                "c0ffee".into()
            ))
        );
        assert_eq!(
            job_key(&env, &CgroupFacts::default()),
            Some(JobKey::Slurm("991".into()))
        );
        assert_eq!(
            job_key(
                &env_facts(b"TORCHELASTIC_RUN_ID=r\0"),
                &CgroupFacts::default()
            ),
            Some(JobKey::Elastic("r".into()))
        );
        assert_eq!(job_key(&EnvFacts::default(), &CgroupFacts::default()), None);
    }
}
