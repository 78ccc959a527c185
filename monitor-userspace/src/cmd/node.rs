//! `stallmon node`: every job on the host, found as it starts (a process takes a GPU context,
//! or a command line matches `--match`), followed until it ends, forgotten `--forget-after`
//! later. One set of kernel programs serves all jobs.
use std::time::Duration;

use anyhow::{Context, Result};

use super::{
    Endpoint, Outputs, Stop, check_host, load_options, open_outputs, print_summary, run_loop,
    trace::hostname,
};
use crate::{
    cli::{GpuChoice, NodeArgs},
    discover::{DiscoverConfig, Jobs, node::NodeDiscovery},
    gpu::{INIT_TIMEOUT, Sampler},
    kernel::Kernel,
    privileges,
    schema::ready::Ready,
    session::{Parts, Session, Settings},
};

/// How often `--match` scans the process table.
const MATCH_SCAN: Duration = Duration::from_secs(1);

pub fn run(args: NodeArgs) -> Result<i32> {
    let c = &args.common;
    check_host(c)?;
    let Outputs { recorder, listener } = open_outputs(c)?;
    let kernel = Kernel::load(load_options(c))?;
    let jobs = Jobs::new(DiscoverConfig {
        max_slots: c.max_ranks,
        feeder_tid: None,
        forget_after: args.forget_after,
    });
    // Created before the capabilities go: it reads stallmon's own ancestry.
    let discovery = NodeDiscovery::new(args.matchers.clone(), MATCH_SCAN);
    privileges::drop_capabilities_after_attach().context("dropping capabilities after attach")?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let c = &args.common;
        let endpoint = Endpoint::start(listener, c.interval)?;
        let sampler = match c.gpu() {
            GpuChoice::Off(why) => Err(why),
            GpuChoice::Nvml(opts) => {
                match tokio::task::block_in_place(|| Sampler::start(opts, INIT_TIMEOUT)) {
                    Ok(s) => Ok(s),
                    Err(e) if e.is_bad_selection() => anyhow::bail!("--gpus: {e}"),
                    Err(e) => Err(format!("GPU attribution disabled: {e}")),
                }
            }
        };
        match &sampler {
            Err(why) if args.matchers.is_empty() => {
                tracing::warn!("{why}; without NVML and without --match no job will be found")
            }
            Err(why) => tracing::warn!("{why}"),
            Ok(_) => {}
        }
        // Asked whenever it exists (a kubelet may start, or the mount appear, after stallmon).
        let pod_resources = Some(args.pod_resources_socket.clone());
        let mut session = Session::new(Parts {
            settings: Settings {
                mode: "node",
                interval: c.interval,
                syscalls: c.syscalls,
                gpus_named: false,
                pod_resources,
                backfill: false,
                hostname: hostname(),
            },
            kernel,
            jobs,
            node: Some(discovery),
            sampler,
            recorder,
            view: endpoint.view.clone(),
            health: endpoint.health.clone(),
        });
        tracing::info!(
            "following every job on this host; metrics on http://{}/metrics",
            endpoint.addr
        );
        let ready = Ready {
            pid: std::process::id(),
            listen: endpoint.addr.to_string(),
            mode: "node".into(),
            target_pid: 0,
            syscalls: c.syscalls,
        };
        let stop = run_loop(
            &mut session,
            c.interval,
            c.duration,
            c.ready_file.as_ref(),
            ready,
            |_| false,
        )
        .await?;
        let summary = session.finish(None);
        endpoint.stop().await;
        print_summary(&summary, c.json);
        let why = match stop {
            Stop::Signal(s) => s,
            Stop::Duration => "duration reached",
            Stop::Done => "done",
        };
        tracing::info!("stopped ({why})");
        Ok(0)
    })
}
