//! Dropping capabilities once the eBPF programs are attached.
//!
//! stallmon needs CAP_BPF, CAP_PERFMON and (on old kernels) CAP_SYS_RESOURCE
//! only to load programs, create maps and attach them. Once that is done it
//! keeps running for days next to a training job with an HTTP endpoint open,
//! so it gives up everything it no longer needs:
//!
//! - **CAP_SYS_PTRACE** is kept: reading `/proc/PID/environ`, `/proc/PID/fd`
//!   and `/proc/PID/fdinfo` of a process owned by another user goes through
//!   the kernel's ptrace access check (read mode). stallmon reads them for
//!   every new process of the job (DataLoader workers are forked while it
//!   runs): the environment for the job name, the fd links to tell files from
//!   pipes and sockets.
//! - **CAP_DAC_READ_SEARCH** is kept: the same `/proc/PID` directories are
//!   mode 0500 and owned by the job's user, so even with the ptrace check
//!   passed, file permissions refuse the lookup without it.
//! - **CAP_BPF** is kept only on kernels older than 5.19 that disable
//!   unprivileged BPF (`kernel.unprivileged_bpf_disabled` != 0): there every
//!   bpf() call, map lookups on already open maps included, needs CAP_BPF
//!   (or CAP_SYS_ADMIN before 5.8, where CAP_BPF does not exist). Since 5.19
//!   map and ring buffer access through an fd obtained while privileged works
//!   without it.
//!
//! Everything else is removed from the effective, permitted, inheritable and
//! ambient sets, and from the bounding set when the process may still change
//! it (it holds CAP_SETPCAP; under systemd or in a container the bounding set
//! is usually already reduced by the unit or the runtime).
//!
//! Capabilities belong to threads, not processes: [`drop_capabilities_after_attach`]
//! must run while the process has a single thread, before the async runtime,
//! NVML or anything else starts threads (threads inherit the capabilities of
//! the thread that creates them). It refuses to run otherwise. Loading new
//! programs after the drop (for example uprobes on a newly exec'd binary) is
//! no longer possible. The block issue probe, loaded before the drop, is
//! detached and attached again at run time; if the kernel refuses the
//! re-attach, stallmon says so once and block latency is missing for devices
//! the kernel does not time itself.

use std::collections::BTreeSet;
use std::fmt;

use anyhow::{Context, Result, bail};
use caps::{CapSet, Capability, CapsHashSet};

/// Capabilities kept after attaching on every kernel; see the module documentation.
pub const ALWAYS_KEPT: [Capability; 2] =
    [Capability::CAP_SYS_PTRACE, Capability::CAP_DAC_READ_SEARCH];

/// What the running kernel needs to know to decide which capabilities to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFacts {
    /// (major, minor) of the running kernel, if it could be parsed.
    pub version: Option<(u32, u32)>,
    /// Value of `kernel.unprivileged_bpf_disabled`; `None` when unreadable.
    pub unprivileged_bpf_disabled: Option<u32>,
}

impl KernelFacts {
    /// Reads the facts of the running kernel.
    pub fn current() -> Self {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .or_else(|| {
                // SAFETY: uname fills a zeroed struct; release is NUL-terminated.
                unsafe {
                    let mut u: libc::utsname = std::mem::zeroed();
                    (libc::uname(&mut u) == 0).then(|| {
                        std::ffi::CStr::from_ptr(u.release.as_ptr())
                            .to_string_lossy()
                            .into_owned()
                    })
                }
            });
        KernelFacts {
            version: release.as_deref().and_then(parse_kernel_version),
            unprivileged_bpf_disabled: std::fs::read_to_string(
                "/proc/sys/kernel/unprivileged_bpf_disabled",
            )
            .ok()
            .and_then(|s| s.trim().parse().ok()),
        }
    }
}

/// (major, minor) from a kernel release string such as `6.18.44-cloud-amd64`.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The capabilities to keep after attaching, on a kernel described by `facts`.
pub fn capabilities_to_keep(facts: &KernelFacts) -> CapsHashSet {
    let mut keep: CapsHashSet = ALWAYS_KEPT.into_iter().collect();
    // Unknown values are treated as the restrictive case: keeping one more
    // capability is better than losing access to the maps.
    let unpriv_disabled = facts.unprivileged_bpf_disabled != Some(0);
    match facts.version {
        Some(v) if v >= (5, 19) => {}
        Some(v) if v >= (5, 8) => {
            if unpriv_disabled {
                keep.insert(Capability::CAP_BPF);
            }
        }
        Some(_) => {
            if unpriv_disabled {
                keep.insert(Capability::CAP_SYS_ADMIN);
            }
        }
        None => {
            keep.insert(Capability::CAP_BPF);
        }
    }
    keep
}

/// Drops every capability except [`capabilities_to_keep`] for the running
/// kernel. Call once, right after all eBPF programs are loaded and attached,
/// while the process is still single-threaded.
pub fn drop_capabilities_after_attach() -> Result<()> {
    let threads = thread_count()?;
    if threads != 1 {
        bail!(
            "refusing to drop capabilities with {threads} threads running: capabilities are \
             per thread, so the others would keep theirs; drop them before starting the \
             runtime or NVML"
        );
    }
    let facts = KernelFacts::current();
    let keep = capabilities_to_keep(&facts);
    let before = current_capabilities()?;
    drop_all_except(&keep)?;
    let after = current_capabilities()?;
    tracing::debug!(
        "dropped capabilities (kernel {:?}, unprivileged_bpf_disabled={:?}): {} -> {}",
        facts.version,
        facts.unprivileged_bpf_disabled,
        before.effective_names(),
        after.effective_names()
    );
    Ok(())
}

/// Removes from the calling thread every capability not in `keep`, in every set.
/// Capabilities in `keep` stay where they were and are never added.
pub fn drop_all_except(keep: &CapsHashSet) -> Result<()> {
    let permitted =
        caps::read(None, CapSet::Permitted).context("reading permitted capabilities")?;
    let effective =
        caps::read(None, CapSet::Effective).context("reading effective capabilities")?;

    // 1. Bounding set first: dropping from it needs CAP_SETPCAP in the
    //    effective set, which the last steps remove.
    let bounding = caps::read(None, CapSet::Bounding).context("reading the bounding set")?;
    let extra_bounding: Vec<Capability> = bounding.difference(keep).copied().collect();
    if !extra_bounding.is_empty() {
        let setpcap = Capability::CAP_SETPCAP;
        if !effective.contains(&setpcap) && permitted.contains(&setpcap) {
            caps::raise(None, CapSet::Effective, setpcap).context("raising CAP_SETPCAP")?;
        }
        if caps::has_cap(None, CapSet::Effective, setpcap).unwrap_or(false) {
            for cap in extra_bounding {
                caps::drop(None, CapSet::Bounding, cap)
                    .with_context(|| format!("dropping {cap} from the bounding set"))?;
            }
        } else {
            tracing::debug!(
                "bounding set left as it is (no CAP_SETPCAP); it only limits what a later \
                 execve could gain"
            );
        }
    }

    // 2. Ambient: lowering is always allowed. Kernels before 4.3 have no
    //    ambient set; reading it fails there and there is nothing to drop.
    if let Ok(ambient) = caps::read(None, CapSet::Ambient) {
        for cap in ambient.difference(keep) {
            caps::drop(None, CapSet::Ambient, *cap)
                .with_context(|| format!("dropping {cap} from the ambient set"))?;
        }
    }

    // 3. Inheritable: lowering is always allowed.
    let inheritable =
        caps::read(None, CapSet::Inheritable).context("reading inheritable capabilities")?;
    caps::set(None, CapSet::Inheritable, &intersect(&inheritable, keep))
        .context("setting inheritable capabilities")?;

    // 4. Effective then permitted (effective must stay a subset of permitted).
    let kept = intersect(&permitted, keep);
    caps::set(None, CapSet::Effective, &kept).context("setting effective capabilities")?;
    caps::set(None, CapSet::Permitted, &kept).context("setting permitted capabilities")?;

    // Verify: a silent failure here would leave the daemon privileged.
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        let now = caps::read(None, set)?;
        if !now.is_subset(keep) {
            bail!(
                "capabilities still held after dropping ({set:?}): {}",
                names(&now)
            );
        }
    }
    Ok(())
}

fn intersect(a: &CapsHashSet, b: &CapsHashSet) -> CapsHashSet {
    a.intersection(b).copied().collect()
}

fn names(set: &CapsHashSet) -> String {
    let sorted: BTreeSet<String> = set.iter().map(|c| c.to_string().to_lowercase()).collect();
    format!("[{}]", sorted.into_iter().collect::<Vec<_>>().join(","))
}

/// Number of threads of this process.
fn thread_count() -> Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")
        .context("listing /proc/self/task")?
        .count())
}

/// The capability sets of the calling thread, for logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityReport {
    pub effective: CapsHashSet,
    pub permitted: CapsHashSet,
    pub inheritable: CapsHashSet,
    /// Empty on kernels without ambient capabilities (before 4.3).
    pub ambient: CapsHashSet,
    pub bounding: CapsHashSet,
}

impl CapabilityReport {
    /// The effective set as `[cap_a,cap_b]`, sorted.
    pub fn effective_names(&self) -> String {
        names(&self.effective)
    }
}

impl fmt::Display for CapabilityReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The bounding set of an unrestricted process holds every capability:
        // print its size rather than 41 names.
        let bounding = if self.bounding == caps::all() {
            "all".to_string()
        } else {
            names(&self.bounding)
        };
        write!(
            f,
            "effective={} permitted={} inheritable={} ambient={} bounding={}",
            names(&self.effective),
            names(&self.permitted),
            names(&self.inheritable),
            names(&self.ambient),
            bounding
        )
    }
}

/// Reads the capability sets of the calling thread.
pub fn current_capabilities() -> Result<CapabilityReport> {
    Ok(CapabilityReport {
        effective: caps::read(None, CapSet::Effective).context("reading effective capabilities")?,
        permitted: caps::read(None, CapSet::Permitted).context("reading permitted capabilities")?,
        inheritable: caps::read(None, CapSet::Inheritable)
            .context("reading inheritable capabilities")?,
        ambient: caps::read(None, CapSet::Ambient).unwrap_or_default(),
        bounding: caps::read(None, CapSet::Bounding).context("reading the bounding set")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(version: Option<(u32, u32)>, unpriv: Option<u32>) -> KernelFacts {
        KernelFacts {
            version,
            unprivileged_bpf_disabled: unpriv,
        }
    }

    fn set(caps: &[Capability]) -> CapsHashSet {
        caps.iter().copied().collect()
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_kernel_version("6.18.44"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.15.0-105-generic\n"), Some((5, 15)));
        assert_eq!(parse_kernel_version("6.1.0-21-cloud-amd64"), Some((6, 1)));
        assert_eq!(parse_kernel_version("4.18.0-513.el8.x86_64"), Some((4, 18)));
        assert_eq!(parse_kernel_version("6.9-rc1"), Some((6, 9)));
        assert_eq!(parse_kernel_version("garbage"), None);
        assert_eq!(parse_kernel_version("6"), None);
    }

    #[test]
    fn modern_kernels_keep_only_proc_access() {
        let only = set(&ALWAYS_KEPT);
        for unpriv in [None, Some(0), Some(1), Some(2)] {
            assert_eq!(capabilities_to_keep(&facts(Some((5, 19)), unpriv)), only);
            assert_eq!(capabilities_to_keep(&facts(Some((6, 18)), unpriv)), only);
        }
    }

    #[test]
    fn old_kernels_keep_bpf_access_when_unprivileged_bpf_is_off() {
        let with_bpf = set(&[
            Capability::CAP_SYS_PTRACE,
            Capability::CAP_DAC_READ_SEARCH,
            Capability::CAP_BPF,
        ]);
        assert_eq!(
            capabilities_to_keep(&facts(Some((5, 15)), Some(2))),
            with_bpf
        );
        assert_eq!(
            capabilities_to_keep(&facts(Some((5, 8)), Some(1))),
            with_bpf
        );
        assert_eq!(capabilities_to_keep(&facts(Some((5, 15)), None)), with_bpf);
        assert_eq!(
            capabilities_to_keep(&facts(Some((5, 15)), Some(0))),
            set(&ALWAYS_KEPT)
        );
        // Before CAP_BPF existed, CAP_SYS_ADMIN guarded bpf().
        assert!(
            capabilities_to_keep(&facts(Some((5, 4)), Some(1)))
                .contains(&Capability::CAP_SYS_ADMIN)
        );
        assert_eq!(
            capabilities_to_keep(&facts(Some((5, 4)), Some(0))),
            set(&ALWAYS_KEPT)
        );
        // Unknown kernel: keep CAP_BPF to be safe.
        assert!(capabilities_to_keep(&facts(None, Some(0))).contains(&Capability::CAP_BPF));
    }

    #[test]
    fn load_time_capabilities_are_never_kept_on_current_kernels() {
        let keep = capabilities_to_keep(&facts(Some((6, 1)), Some(2)));
        for cap in [
            Capability::CAP_BPF,
            Capability::CAP_PERFMON,
            Capability::CAP_SYS_RESOURCE,
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_SETPCAP,
            Capability::CAP_NET_ADMIN,
        ] {
            assert!(!keep.contains(&cap), "{cap} must be dropped");
        }
    }

    #[test]
    fn report_formats_sorted_lower_case_names() {
        let r = CapabilityReport {
            effective: set(&[Capability::CAP_SYS_PTRACE, Capability::CAP_BPF]),
            permitted: set(&[Capability::CAP_SYS_PTRACE, Capability::CAP_BPF]),
            inheritable: CapsHashSet::new(),
            ambient: CapsHashSet::new(),
            bounding: caps::all(),
        };
        assert_eq!(r.effective_names(), "[cap_bpf,cap_sys_ptrace]");
        assert_eq!(
            r.to_string(),
            "effective=[cap_bpf,cap_sys_ptrace] permitted=[cap_bpf,cap_sys_ptrace] \
             inheritable=[] ambient=[] bounding=all"
        );
    }

    #[test]
    fn current_capabilities_are_consistent() {
        let r = current_capabilities().expect("capget works for the own thread");
        assert!(r.effective.is_subset(&r.permitted));
        assert!(r.ambient.is_subset(&r.permitted));
        assert!(KernelFacts::current().version.is_some());
    }

    #[test]
    fn refuses_to_drop_with_several_threads() {
        // The test harness runs tests on their own threads, so the process
        // always has more than one thread here, and nothing may be dropped.
        let before = current_capabilities().unwrap();
        let err = drop_capabilities_after_attach().unwrap_err();
        assert!(err.to_string().contains("threads"), "{err}");
        assert_eq!(current_capabilities().unwrap(), before);
    }

    const CHILD_ENV: &str = "STALLMON_PRIVILEGES_TEST_CHILD";

    /// Runs in a child process started by `drop_works_in_a_child_process`, so
    /// the test process itself keeps its capabilities. Capabilities are per
    /// thread: dropping on this test's thread and reading them back on the same
    /// thread exercises the real system calls.
    #[test]
    fn child_drops_capabilities() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let keep = capabilities_to_keep(&KernelFacts::current());
        let before = current_capabilities().unwrap();
        drop_all_except(&keep).expect("dropping must succeed");
        let after = current_capabilities().unwrap();
        assert!(after.effective.is_subset(&keep), "{after}");
        assert!(after.permitted.is_subset(&keep), "{after}");
        assert!(after.inheritable.is_subset(&keep), "{after}");
        assert!(after.ambient.is_subset(&keep), "{after}");
        // What was kept is still there.
        assert_eq!(
            after.permitted,
            intersect(&before.permitted, &keep),
            "{after}"
        );
        assert_eq!(
            after.effective,
            intersect(&before.permitted, &keep),
            "{after}"
        );
        if before.effective.contains(&Capability::CAP_SETPCAP) {
            assert!(after.bounding.is_subset(&keep), "{after}");
        }
        // Dropped capabilities cannot come back.
        if !keep.contains(&Capability::CAP_SYS_ADMIN) {
            assert!(caps::raise(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).is_err());
        }
        println!("STALLMON-CAPS-CHILD-OK before: {before} after: {after}");
    }

    #[test]
    fn drop_works_in_a_child_process() {
        // "crate::a::b::tests" -> "a::b::tests::child_drops_capabilities"
        let module = module_path!().split_once("::").map_or("", |(_, rest)| rest);
        let name = format!("{module}::child_drops_capabilities");
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .output()
            .expect("re-running the test binary");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("STALLMON-CAPS-CHILD-OK"),
            "child failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        // This process is untouched.
        assert!(current_capabilities().is_ok());
    }
}
