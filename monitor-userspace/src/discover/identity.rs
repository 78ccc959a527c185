//! The training job's name: the constant `job_name` label of every metric.
//!
//! Resolution order, first match wins:
//! 1. the name given on the command line (`--job-name`);
//! 2. the traced process's environment (`/proc/PID/environ`): `SLURM_JOB_ID`
//!    gives `slurm-<id>`, `TORCHELASTIC_RUN_ID` (set by torchrun) is used as is;
//! 3. the Kubernetes pod the process runs in, from the pod UID in its cgroup
//!    path (`/proc/PID/cgroup`): `pod-<uid>`;
//! 4. the process's command name (`/proc/PID/comm`);
//! 5. `pid-<PID>` when even that cannot be read (the process is gone).
//!
//! Reading another user's `/proc/PID/environ` needs CAP_SYS_PTRACE (the same
//! check as ptrace in read mode); without it step 2 is skipped silently.
//! The environment is only searched for the variables above: nothing else from
//! it is kept or logged, as it may hold secrets.
//!
//! The parsing is split into pure functions over the file contents so that it
//! can be tested without processes.

use std::path::Path;

/// Environment variable set by Slurm in every job step.
const SLURM_JOB_ID: &str = "SLURM_JOB_ID";
/// Environment variable set by torchrun / TorchElastic for every worker.
const TORCHELASTIC_RUN_ID: &str = "TORCHELASTIC_RUN_ID";

/// Job name for the process `pid`; see the module documentation for the order.
pub fn job_name(explicit: Option<&str>, pid: u32) -> String {
    job_name_in(Path::new("/proc"), explicit, pid)
}

/// [`job_name`] with another procfs root (tests use a directory tree).
pub fn job_name_in(proc_root: &Path, explicit: Option<&str>, pid: u32) -> String {
    if let Some(name) = explicit.map(str::trim).filter(|n| !n.is_empty()) {
        return name.to_string();
    }
    let dir = proc_root.join(pid.to_string());
    if let Ok(raw) = std::fs::read(dir.join("environ"))
        && let Some(name) = job_from_environ(&parse_environ(&raw))
    {
        return name;
    }
    if let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup"))
        && let Some(uid) = parse_cgroup(&cgroup)
    {
        return format!("pod-{uid}");
    }
    if let Ok(comm) = std::fs::read_to_string(dir.join("comm"))
        && let Some(comm) = parse_comm(&comm)
    {
        return comm;
    }
    format!("pid-{pid}")
}

/// Splits the contents of `/proc/PID/environ` (`NAME=value` entries separated
/// by NUL bytes) into pairs. Entries without `=` are skipped; bytes that are
/// not UTF-8 are replaced.
pub fn parse_environ(raw: &[u8]) -> Vec<(String, String)> {
    raw.split(|b| *b == 0)
        .filter(|entry| !entry.is_empty())
        .filter_map(|entry| {
            let eq = entry.iter().position(|b| *b == b'=')?;
            let (name, value) = (&entry[..eq], &entry[eq + 1..]);
            if name.is_empty() {
                return None;
            }
            Some((
                String::from_utf8_lossy(name).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            ))
        })
        .collect()
}

/// The job name found in an environment, if any: `slurm-<SLURM_JOB_ID>`, else
/// `TORCHELASTIC_RUN_ID`. torchrun sets the run id to `none` when no
/// `--rdzv-id` was given; that is not a name and is ignored.
pub fn job_from_environ(vars: &[(String, String)]) -> Option<String> {
    let get = |name: &str| {
        vars.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    };
    if let Some(id) = get(SLURM_JOB_ID) {
        return Some(format!("slurm-{id}"));
    }
    get(TORCHELASTIC_RUN_ID)
        .filter(|id| !id.eq_ignore_ascii_case("none"))
        .map(str::to_string)
}

/// The Kubernetes pod UID in the contents of `/proc/PID/cgroup`, lower case
/// with dashes, if the process runs in a pod.
///
/// Handles both cgroup drivers, on cgroup v1 and v2:
/// - cgroupfs: `.../kubepods/burstable/pod0f3c...-.../<container>`
/// - systemd:  `.../kubepods-burstable-pod0f3c..._..._....slice/cri-containerd-<id>.scope`
///   (the UID's dashes are written as underscores)
pub fn parse_cgroup(content: &str) -> Option<String> {
    content.lines().find_map(|line| {
        // hierarchy-ID:controllers:path; the path may itself contain ':'.
        let path = line.splitn(3, ':').nth(2)?;
        if !path.contains("kubepods") {
            return None;
        }
        path.split('/').find_map(pod_uid_of_segment)
    })
}

/// The pod UID in one cgroup path segment (`pod<uid>` or
/// `kubepods-<qos>-pod<uid>.slice`), if it is a pod segment.
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

/// The command name in `/proc/PID/comm`, without the trailing newline.
pub fn parse_comm(content: &str) -> Option<String> {
    let comm = content.trim();
    (!comm.is_empty()).then(|| comm.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environ_is_split_on_nul_and_first_equals() {
        let raw = b"PATH=/usr/bin:/bin\0EMPTY=\0EQ=a=b\0NOEQUALS\0=novalue\0\0";
        assert_eq!(
            parse_environ(raw),
            env(&[("PATH", "/usr/bin:/bin"), ("EMPTY", ""), ("EQ", "a=b")])
        );
        assert!(parse_environ(b"").is_empty());
    }

    #[test]
    fn environ_tolerates_invalid_utf8() {
        let parsed = parse_environ(b"SLURM_JOB_ID=42\0BAD=\xff\xfe\0");
        assert_eq!(parsed[0], ("SLURM_JOB_ID".into(), "42".into()));
        assert_eq!(parsed[1].0, "BAD");
    }

    #[test]
    fn slurm_wins_over_torchelastic() {
        let vars = env(&[("TORCHELASTIC_RUN_ID", "run7"), ("SLURM_JOB_ID", "123456")]);
        assert_eq!(job_from_environ(&vars).as_deref(), Some("slurm-123456"));
    }

    #[test]
    fn torchelastic_run_id_is_used_as_is() {
        let vars = env(&[("HOME", "/root"), ("TORCHELASTIC_RUN_ID", "llama-ft-0412")]);
        assert_eq!(job_from_environ(&vars).as_deref(), Some("llama-ft-0412"));
    }

    #[test]
    fn empty_and_default_ids_are_ignored() {
        assert_eq!(job_from_environ(&env(&[("SLURM_JOB_ID", "  ")])), None);
        assert_eq!(
            job_from_environ(&env(&[("TORCHELASTIC_RUN_ID", "none")])),
            None
        );
        assert_eq!(
            job_from_environ(&env(&[("SLURM_JOB_ID", ""), ("TORCHELASTIC_RUN_ID", "r1")]))
                .as_deref(),
            Some("r1")
        );
        assert_eq!(job_from_environ(&env(&[("SLURM_JOBID_X", "1")])), None);
    }

    #[test]
    fn cgroup_v2_cgroupfs_driver() {
        let cg = "0::/kubepods/burstable/pod0f3c1d2e-4a5b-6c7d-8e9f-0a1b2c3d4e5f/3b1a9c0e8d\n";
        assert_eq!(
            parse_cgroup(cg).as_deref(),
            Some("0f3c1d2e-4a5b-6c7d-8e9f-0a1b2c3d4e5f")
        );
    }

    #[test]
    fn cgroup_v2_systemd_driver() {
        let cg = "0::/kubepods.slice/kubepods-besteffort.slice/\
                  kubepods-besteffort-pod0F3C1D2E_4A5B_6C7D_8E9F_0A1B2C3D4E5F.slice/\
                  cri-containerd-7a1e0c9b.scope\n";
        assert_eq!(
            parse_cgroup(cg).as_deref(),
            Some("0f3c1d2e-4a5b-6c7d-8e9f-0a1b2c3d4e5f")
        );
    }

    #[test]
    fn cgroup_v2_guaranteed_qos_systemd() {
        let cg = "0::/kubepods.slice/kubepods-pod11111111_2222_3333_4444_555555555555.slice/cri-containerd-ab.scope";
        assert_eq!(
            parse_cgroup(cg).as_deref(),
            Some("11111111-2222-3333-4444-555555555555")
        );
    }

    #[test]
    fn cgroup_v1_many_controllers() {
        let cg = "12:pids:/kubepods/pod11111111-2222-3333-4444-555555555555/abc\n\
                  11:cpu,cpuacct:/kubepods/pod11111111-2222-3333-4444-555555555555/abc\n\
                  1:name=systemd:/kubepods/pod11111111-2222-3333-4444-555555555555/abc\n";
        assert_eq!(
            parse_cgroup(cg).as_deref(),
            Some("11111111-2222-3333-4444-555555555555")
        );
    }

    #[test]
    fn cgroup_outside_kubernetes() {
        assert_eq!(
            parse_cgroup("0::/user.slice/user-1000.slice/session-3.scope\n"),
            None
        );
        assert_eq!(
            parse_cgroup("0::/system.slice/slurmstepd.scope/job_42/step_0\n"),
            None
        );
        // "pod" in a non-Kubernetes path, or a malformed UID.
        assert_eq!(parse_cgroup("0::/system.slice/podman-1234.scope\n"), None);
        assert_eq!(
            parse_cgroup("0::/kubepods/burstable/podnotauid/abc\n"),
            None
        );
        assert_eq!(parse_cgroup(""), None);
    }

    #[test]
    fn comm_is_trimmed() {
        assert_eq!(parse_comm("python3\n").as_deref(), Some("python3"));
        assert_eq!(parse_comm("\n"), None);
    }

    /// A fake procfs tree, removed on drop.
    struct FakeProc(std::path::PathBuf);
    impl FakeProc {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("stallmon-joblabel-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("77")).unwrap();
            FakeProc(dir)
        }
        fn write(&self, file: &str, content: &[u8]) {
            std::fs::write(self.0.join("77").join(file), content).unwrap();
        }
    }
    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn resolution_order() {
        let p = FakeProc::new("order");
        assert_eq!(job_name_in(&p.0, None, 77), "pid-77");
        p.write("comm", b"python3\n");
        assert_eq!(job_name_in(&p.0, None, 77), "python3");
        p.write(
            "cgroup",
            b"0::/kubepods/besteffort/pod0f3c1d2e-4a5b-6c7d-8e9f-0a1b2c3d4e5f/c0ffee\n",
        );
        assert_eq!(
            job_name_in(&p.0, None, 77),
            "pod-0f3c1d2e-4a5b-6c7d-8e9f-0a1b2c3d4e5f"
        );
        p.write("environ", b"HOME=/root\0TORCHELASTIC_RUN_ID=ft-run\0");
        assert_eq!(job_name_in(&p.0, None, 77), "ft-run");
        p.write("environ", b"TORCHELASTIC_RUN_ID=ft-run\0SLURM_JOB_ID=991\0");
        assert_eq!(job_name_in(&p.0, None, 77), "slurm-991");
        assert_eq!(job_name_in(&p.0, Some(" resnet50 "), 77), "resnet50");
        // An empty explicit name does not count.
        assert_eq!(job_name_in(&p.0, Some(""), 77), "slurm-991");
    }

    #[test]
    fn own_process_has_a_name() {
        // This test process: no Slurm/TorchElastic id expected in CI, so the
        // name is non-empty whatever step matched.
        let name = job_name(None, std::process::id());
        assert!(!name.is_empty());
        assert_eq!(job_name(Some("x"), std::process::id()), "x");
        // A process that does not exist.
        assert_eq!(
            job_name(None, u32::MAX - 1),
            format!("pid-{}", u32::MAX - 1)
        );
    }
}
