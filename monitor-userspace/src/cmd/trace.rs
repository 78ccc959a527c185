//! `stallmon trace`: one job, a running process (`--pid`) or a command (`-- CMD`).
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use super::{
    Endpoint, Outputs, Stop, check_host, load_options, open_outputs, print_summary, run_loop,
};
use crate::{
    cli::{GpuChoice, TraceArgs},
    discover::{DiscoverConfig, Jobs, identity, procfs},
    gpu::{INIT_TIMEOUT, Sampler},
    kernel::Kernel,
    privileges,
    schema::ready::Ready,
    session::{Parts, Session, Settings},
    target::{self, Gated},
};

enum Target {
    Attached(u32),
    Started(Gated),
}

impl Target {
    fn pid(&self) -> u32 {
        match self {
            Target::Attached(p) => *p,
            Target::Started(g) => g.pid(),
        }
    }
}

/// Everything that can fail on the user's input fails here, before any process is started or
/// any program loaded: privileges, kernel, PID, command, record path, ready path, port. Then
/// everything privileged happens before the runtime starts any thread: load and attach, track
/// the job, drop the capabilities that are no longer needed (capabilities are per thread, so this
/// must happen while the process is single-threaded).
pub fn run(args: TraceArgs) -> Result<i32> {
    let c = &args.common;
    check_host(c)?;
    let attach = match args.pid {
        Some(pid) => {
            let (tgid, note) = target::check_pid(pid)?;
            if let Some(note) = note {
                tracing::warn!("{note}");
            }
            Some(tgid)
        }
        None => {
            target::resolve_program(args.command.first().context("no command given after --")?)?;
            None
        }
    };
    if let Some(tid) = args.feeder_tid {
        procfs::tgid_of(tid).ok_or_else(|| anyhow!("--feeder-tid {tid}: no such thread"))?;
    }
    let Outputs { recorder, listener } = open_outputs(c)?;

    // Load and attach before the target is tracked, track before scanning for descendants: a
    // fork at any moment is then either seen by the kernel or found by the scan.
    let mut kernel = Kernel::load(load_options(c))?;
    let mut target = match attach {
        Some(pid) => Target::Attached(pid),
        None => Target::Started(target::spawn_gated(&args.command)?),
    };
    let pid = target.pid();
    // The job's identity: what the target says about itself (a started command inherits our
    // environment), named after the command when nothing else names it.
    let env = procfs::environ(pid)
        .map(|raw| identity::env_facts(&raw))
        .unwrap_or_default();
    let cg = procfs::cgroup(pid)
        .map(|t| identity::cgroup_facts(&t))
        .unwrap_or_default();
    let comm = match &target {
        Target::Started(_) => args
            .command
            .first()
            .and_then(|c| std::path::Path::new(c).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        Target::Attached(p) => procfs::stat(*p).map(|s| s.comm).unwrap_or_default(),
    };
    let labels = identity::job_labels(args.job_name.as_deref(), &env, &cg, None, &comm);
    let command: Vec<String> = args
        .command
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut jobs = Jobs::new(DiscoverConfig {
        max_slots: c.max_ranks,
        feeder_tid: args.feeder_tid,
        forget_after: Duration::MAX,
    });
    let name_open = args.job_name.is_none() && env.elastic_run_id.is_none();
    let tracked = jobs.add_job(&mut kernel, pid, labels, command, None);
    if name_open && let Ok(id) = tracked {
        jobs.open_name(id);
    }
    let job = match tracked {
        Ok(j) => j,
        Err(e) => {
            if let Target::Started(g) = &mut target {
                let _ = g.child.kill();
                let _ = g.child.wait();
            }
            return Err(e.into());
        }
    };
    privileges::drop_capabilities_after_attach().context("dropping capabilities after attach")?;
    // The GPUs before the job runs: their timeline covers the job's start.
    let sampler = match c.gpu() {
        GpuChoice::Off(why) => Err(why),
        GpuChoice::Nvml(opts) => match Sampler::start(opts, INIT_TIMEOUT) {
            Ok(s) => Ok(s),
            Err(e) if e.is_bad_selection() => {
                if let Target::Started(g) = &mut target {
                    let _ = g.child.kill();
                    let _ = g.child.wait();
                }
                anyhow::bail!("--gpus: {e}");
            }
            Err(e) => Err(format!("GPU attribution disabled: {e}")),
        },
    };
    if let Err(why) = &sampler {
        tracing::warn!("{why}");
    }
    match &mut target {
        Target::Started(g) => g.release()?,
        Target::Attached(p) => {
            if !procfs::alive(*p) {
                anyhow::bail!("PID {p} exited before tracing started");
            }
        }
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let c = &args.common;
        let endpoint = Endpoint::start(listener, c.interval)?;
        let mut session = Session::new(Parts {
            settings: Settings {
                mode: "trace",
                interval: c.interval,
                syscalls: c.syscalls,
                gpus_named: c.gpus.is_some(),
                pod_resources: None,
                backfill: true,
                hostname: hostname(),
            },
            kernel,
            jobs,
            node: None,
            sampler,
            recorder,
            view: endpoint.view.clone(),
            health: endpoint.health.clone(),
        });
        let job_name = session
            .jobs
            .get(job)
            .map(|j| j.labels.job_name.clone())
            .unwrap_or_default();
        tracing::info!(
            pid,
            job = %job_name,
            "tracing PID {pid}; metrics on http://{}/metrics",
            endpoint.addr
        );
        let ready = Ready {
            pid: std::process::id(),
            listen: endpoint.addr.to_string(),
            mode: "trace".into(),
            target_pid: pid,
            syscalls: c.syscalls,
        };
        let mut exit_status = None;
        let stop = run_loop(
            &mut session,
            c.interval,
            c.duration,
            c.ready_file.as_ref(),
            ready,
            |_| match &mut target {
                Target::Started(g) => match g.child.try_wait() {
                    Ok(Some(status)) => {
                        exit_status = Some(target::exit_code(status));
                        true
                    }
                    Ok(None) => false,
                    Err(_) => true,
                },
                Target::Attached(p) => !procfs::alive(*p),
            },
        )
        .await?;
        if let Target::Started(g) = &mut target
            && exit_status.is_none()
        {
            let pids: Vec<u32> = session
                .jobs
                .get(job)
                .map(|j| j.live_pids().collect())
                .unwrap_or_default();
            exit_status = Some(target::stop_tree(&mut g.child, &pids));
        }
        let summary = session.finish(Some((job, exit_status)));
        endpoint.stop().await;
        print_summary(&summary, c.json);
        let why = match stop {
            Stop::Signal(s) => s,
            Stop::Duration => "duration reached",
            Stop::Done => "target exited",
        };
        tracing::info!("stopped ({why})");
        Ok(match target {
            Target::Started(_) => exit_status.unwrap_or(1),
            Target::Attached(_) => 0,
        })
    })
}

/// This host's name (the `Hostname` label of `stallmon_gpu_info`).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: valid buffer and length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    identity::sanitize(&String::from_utf8_lossy(&buf[..end]))
}
