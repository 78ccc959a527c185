//! The exit summary, in the spirit of `perf stat`: built from the ledger and the attribution
//! totals into the typed [`Summary`], printed as a table on stderr (or as JSON with `--json`).
//! Live tracing and `stallmon report` both call [`build`].
use std::{collections::BTreeMap, fmt::Write as _};

use monitor_common::{DROP_NAMES, FD_KIND_NAMES, NUM_STATES, ROLE_NAMES, STATE_NAMES};

use crate::{
    attribution::RankGpuTotals,
    collector::HistTotals,
    hist::{Log2Hist, fmt_bytes, fmt_seconds},
    ledger::{JobAcc, Ledger, RoleAcc},
    schema::summary::*,
    verdict::{VerdictContext, verdict},
};

/// What the summary says beyond the ledger's figures.
pub struct Context<'a> {
    pub mode: &'a str,
    pub duration_seconds: f64,
    pub syscalls: bool,
    pub gpu_source: Option<String>,
    pub gpu_disabled: Option<String>,
}

fn latency(h: &HistTotals) -> LatencySummary {
    let l = Log2Hist::from_counts(h.hist);
    LatencySummary {
        count: l.total(),
        mean_seconds: (h.count > 0).then(|| h.sum_ns as f64 * 1e-9 / h.count as f64),
        p50_seconds: l.quantile(0.5),
        p90_seconds: l.quantile(0.9),
        p99_seconds: l.quantile(0.99),
        histogram: h.hist.to_vec(),
    }
}

fn role_summary(role: &str, acc: &RoleAcc, seen: (u64, u64)) -> RoleSummary {
    RoleSummary {
        role: role.to_string(),
        state_seconds: STATE_NAMES
            .iter()
            .enumerate()
            .map(|(i, s)| (s.to_string(), acc.state_ns[i] as f64 * 1e-9))
            .collect(),
        live_processes: acc.processes,
        processes_seen: seen.0,
        processes_exited: seen.1,
        block_requests: acc.blk_requests,
        block_bytes: acc.blk_bytes,
    }
}

fn add_roles(into: &mut RoleAcc, from: &RoleAcc) {
    for s in 0..NUM_STATES {
        into.state_ns[s] += from.state_ns[s];
    }
    for (a, b) in into.stalls.iter_mut().zip(&from.stalls) {
        a.count += b.count;
        a.sum_ns += b.sum_ns;
        for (x, y) in a.hist.iter_mut().zip(&b.hist) {
            *x += y;
        }
    }
    if let Some(r) = &from.reads {
        let acc = into.reads.get_or_insert_with(Default::default);
        for (a, b) in acc.iter_mut().zip(r) {
            a.bytes += b.bytes;
            a.errors += b.errors;
            a.latency.count += b.latency.count;
            a.latency.sum_ns += b.latency.sum_ns;
            for (x, y) in a.latency.hist.iter_mut().zip(&b.latency.hist) {
                *x += y;
            }
        }
    }
    into.blk_requests += from.blk_requests;
    into.blk_bytes += from.blk_bytes;
    into.task_io.add(&from.task_io);
    into.processes += from.processes;
}

/// The job's totals per role, over its ranks.
pub fn job_roles(job: &JobAcc) -> BTreeMap<String, RoleAcc> {
    let mut out: BTreeMap<String, RoleAcc> = BTreeMap::new();
    for ((_, role), acc) in &job.roles {
        add_roles(out.entry(role.clone()).or_default(), acc);
    }
    out
}

/// The verdict's inputs for one job: where its reads went and how slow they were.
pub fn verdict_context(
    ledger: &Ledger,
    job: &JobAcc,
    syscalls: bool,
    simulated: bool,
    rank: Option<String>,
) -> VerdictContext {
    let roles = job_roles(job);
    let file = 0; // FD_FILE
    // The p99 of the file reads of the role that read most (whole calls with --syscalls, else
    // the sleeps inside them).
    let read_p99_s = if syscalls {
        roles
            .values()
            .filter_map(|r| r.reads.as_ref().map(|k| k[file]))
            .max_by_key(|r| r.bytes)
            .and_then(|r| Log2Hist::from_counts(r.latency.hist).quantile(0.99))
    } else {
        roles
            .values()
            .map(|r| r.stalls[file])
            .max_by_key(|h| h.count)
            .and_then(|h| Log2Hist::from_counts(h.hist).quantile(0.99))
    };
    // The disk the job's files are on; else the device its own requests went to; else the
    // busiest read device (I/O started by a kernel thread on the job's behalf is not
    // attributed to it).
    let reads = || ledger.block.iter().filter(|((_, op), _)| op == "read");
    let read_device = job
        .data_device()
        .or_else(|| {
            reads()
                .filter(|(_, b)| b.job_bytes.iter().sum::<u64>() > 0)
                .max_by_key(|(_, b)| b.job_bytes.iter().sum::<u64>())
                .map(|((d, _), _)| d.clone())
        })
        .or_else(|| {
            reads()
                .filter(|(_, b)| b.bytes > 0)
                .max_by_key(|(_, b)| b.bytes)
                .map(|((d, _), _)| d.clone())
        });
    VerdictContext {
        simulated,
        read_device,
        read_p99_s,
        p99_of_stalls: !syscalls,
        hottest_path: job.hottest_path(),
        rank,
    }
}

fn job_summary(
    ledger: &Ledger,
    id: u32,
    job: &JobAcc,
    gpu_totals: &[&RankGpuTotals],
    ctx: &Context,
) -> JobSummary {
    let roles_acc = job_roles(job);
    let mut roles = Vec::new();
    let mut stalls = Vec::new();
    let mut reads = Vec::new();
    let mut task_io = Vec::new();
    for name in ROLE_NAMES {
        let acc = roles_acc.get(name).cloned().unwrap_or_default();
        let seen = job.seen.get(name).copied().unwrap_or_default();
        roles.push(role_summary(name, &acc, seen));
        task_io.push(TaskIoSummary {
            role: name.to_string(),
            read_syscalls: acc.task_io.syscr,
            read_bytes: acc.task_io.rchar,
            storage_read_bytes: acc.task_io.read_bytes,
        });
        if name == "launcher" {
            continue;
        }
        for (k, kind) in FD_KIND_NAMES.iter().enumerate() {
            stalls.push(StallSummary {
                role: name.to_string(),
                fd_kind: kind.to_string(),
                latency: latency(&acc.stalls[k]),
            });
            if let Some(r) = &acc.reads {
                reads.push(ReadSummary {
                    role: name.to_string(),
                    fd_kind: kind.to_string(),
                    count: r[k].latency.count,
                    bytes: r[k].bytes,
                    errors: r[k].errors,
                    latency: latency(&r[k].latency),
                });
            }
        }
    }
    let ranks = job
        .ranks
        .iter()
        .map(|(rank, meta)| RankSummary {
            rank: rank.clone(),
            local_rank: meta.local_rank,
            feeders: meta.feeders.clone(),
            roles: ["feeder", "worker"]
                .iter()
                .map(|role| {
                    let acc = job
                        .roles
                        .get(&(rank.clone(), role.to_string()))
                        .cloned()
                        .unwrap_or_default();
                    role_summary(role, &acc, (0, 0))
                })
                .collect(),
        })
        .collect();
    let processes = job
        .procs
        .iter()
        .map(|(&pid, p)| ProcessSummary {
            pid,
            rank: p.rank.clone(),
            role: p.role.clone(),
            parent: p.parent,
            comm: p.comm.clone(),
            exited: p.exited,
            execs: p.execs,
            state_seconds: p.state_ns.map(|v| v as f64 * 1e-9),
            stall_count: p.stall_count,
            read_count: p.read_count,
            read_bytes: p.read_bytes,
            task_read_syscalls: p.task_io.syscr,
            task_read_bytes: p.task_io.rchar,
            storage_read_bytes: p.task_io.read_bytes,
        })
        .collect();

    let multi_rank = job.ranks.len() > 1;
    let simulated = ctx.gpu_source.as_deref() == Some("simulated");
    let mut gpu = Vec::new();
    let mut gpu_verdicts = Vec::new();
    for t in gpu_totals {
        let meta = ledger.gpus.get(&t.totals.gpu).cloned().unwrap_or_default();
        gpu.push(GpuSummary {
            gpu: t.totals.gpu,
            uuid: t.identity.uuid.clone(),
            model: t.identity.model.clone(),
            pci_bus_id: t.identity.pci_bus_id.clone(),
            rank: t.rank.clone(),
            source: ctx.gpu_source.clone(),
            simulated,
            wall_seconds: t.totals.wall_s,
            busy_seconds: t.totals.busy_s,
            idle_seconds: IdleSeconds::from_array(t.totals.idle_s),
            idle_total_seconds: t.totals.idle_total_s(),
            io_feeder_seconds: t.totals.io_feeder_s,
            samples: t.totals.samples,
            stale: meta.stale.clone(),
        });
        let rank = multi_rank.then(|| t.rank.clone());
        let vctx = verdict_context(ledger, job, ctx.syscalls, simulated, rank);
        let mut line = verdict(&t.totals, &vctx);
        if let Some(why) = &meta.stale {
            line.push_str(&format!(
                " [GPU went stale during the run: {why}; figures cover only the samples received]"
            ));
        }
        gpu_verdicts.push(line);
    }
    if gpu_totals.is_empty() && ctx.gpu_source.is_some() {
        let what = if simulated { "simulated GPU" } else { "GPU" };
        gpu_verdicts.push(format!(
            "no {what} samples for the job's GPUs (no GPU context held by the job? name them with --gpus)"
        ));
    }
    JobSummary {
        job: id,
        labels: job.labels.clone(),
        root_pid: job.root_pid,
        exit_status: job.exit_status,
        ranks,
        roles,
        stalls,
        reads,
        task_io,
        processes,
        processes_omitted: job.procs_omitted,
        gpu,
        gpu_verdicts,
        hottest_path: job.hottest_path(),
        data_device: job.data_device(),
    }
}

/// The summary of everything in the ledger.
pub fn build(ledger: &Ledger, gpu_totals: &[RankGpuTotals], ctx: &Context) -> Summary {
    let block = ledger
        .block
        .iter()
        .map(|((device, op), b)| BlockSummary {
            device: device.clone(),
            op: op.clone(),
            requests: b.requests,
            bytes: b.bytes,
            errors: b.errors,
            latency: latency(&b.latency),
            queue: latency(&b.queue),
            job_requests: b.job_requests,
            job_bytes: b.job_bytes,
        })
        .collect();
    let dropped_events = DROP_NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), ledger.drops.get(i).copied().unwrap_or(0)))
        .collect();
    let jobs = ledger
        .jobs
        .iter()
        .map(|(&id, job)| {
            let totals: Vec<&RankGpuTotals> = gpu_totals.iter().filter(|t| t.job == id).collect();
            job_summary(ledger, id, job, &totals, ctx)
        })
        .collect();
    Summary {
        version: VERSION,
        mode: ctx.mode.to_string(),
        duration_seconds: ctx.duration_seconds,
        syscalls: ctx.syscalls,
        block,
        dropped_events,
        record_errors: ledger.record_errors,
        gpu_source: ctx.gpu_source.clone(),
        gpu_disabled: ctx.gpu_disabled.clone(),
        jobs,
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(fmt_seconds).unwrap_or_else(|| "-".into())
}

fn pct_of(r: &RoleSummary, s: &str) -> String {
    let total: f64 = r.state_seconds.values().sum();
    let v = r.state_seconds.get(s).copied().unwrap_or(0.0);
    if total > 0.0 {
        format!("{:.1}%", 100.0 * v / total)
    } else {
        "-".into()
    }
}

fn state_rows(o: &mut String, label: &str, roles: &[RoleSummary]) {
    for r in roles.iter().filter(|r| r.role != "launcher") {
        let _ = writeln!(
            o,
            " {:<22} {:>9} {:>13} {:>9} {:>11}   {} seen, {} exited",
            format!("{label}{}", r.role),
            pct_of(r, "on_cpu"),
            pct_of(r, "storage_wait"),
            pct_of(r, "ipc_wait"),
            pct_of(r, "other_wait"),
            r.processes_seen,
            r.processes_exited
        );
    }
}

/// The human table.
pub fn human(s: &Summary) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\n stallmon summary: {:.1} s traced, {} job(s){}\n",
        s.duration_seconds,
        s.jobs.len(),
        if s.syscalls { ", --syscalls" } else { "" }
    );
    let _ = writeln!(
        o,
        " {:<22} {:>9} {:>11} {:>9} {:>9} {:>9} {:>10}",
        "block I/O (device op)", "requests", "bytes", "p50", "p90", "p99", "queue p99"
    );
    for b in s.block.iter().filter(|b| b.requests > 0) {
        let _ = writeln!(
            o,
            " {:<22} {:>9} {:>11} {:>9} {:>9} {:>9} {:>10}",
            format!("{} {}", b.device, b.op),
            b.requests,
            fmt_bytes(b.bytes),
            opt(b.latency.p50_seconds),
            opt(b.latency.p90_seconds),
            opt(b.latency.p99_seconds),
            opt(b.queue.p99_seconds),
        );
    }
    for j in &s.jobs {
        let _ = writeln!(
            o,
            "\n job \"{}\"{}{} (root PID {}){}",
            j.labels.job_name,
            if j.labels.pod.is_empty() {
                String::new()
            } else {
                format!(", pod {}/{}", j.labels.namespace, j.labels.pod)
            },
            if j.labels.hpc_job.is_empty() {
                String::new()
            } else {
                format!(", SLURM job {}", j.labels.hpc_job)
            },
            j.root_pid,
            j.exit_status
                .map(|c| format!(", exit status {c}"))
                .unwrap_or_default()
        );
        for r in &j.ranks {
            for f in r.feeders.iter().rev().take(1) {
                let _ = writeln!(
                    o,
                    "   rank {}: feeder PID {} ({}){} -- {}",
                    r.rank,
                    f.pid,
                    f.comm,
                    if f.gpus.is_empty() {
                        String::new()
                    } else {
                        format!(" on GPU {:?}", f.gpus)
                    },
                    f.why
                );
            }
        }
        if s.syscalls {
            let _ = writeln!(
                o,
                "\n {:<22} {:>9} {:>11} {:>9} {:>9} {:>9}",
                "read calls (role fd)", "count", "bytes", "mean", "p50", "p99"
            );
            for r in j.reads.iter().filter(|r| r.count > 0) {
                let _ = writeln!(
                    o,
                    " {:<22} {:>9} {:>11} {:>9} {:>9} {:>9}",
                    format!("{} {}", r.role, r.fd_kind),
                    r.count,
                    fmt_bytes(r.bytes),
                    opt(r.latency.mean_seconds),
                    opt(r.latency.p50_seconds),
                    opt(r.latency.p99_seconds),
                );
            }
        }
        let _ = writeln!(
            o,
            "\n {:<22} {:>9} {:>9} {:>9} {:>9}",
            "read stalls (role fd)", "stalls", "mean", "p50", "p99"
        );
        for st in j.stalls.iter().filter(|st| st.latency.count > 0) {
            let _ = writeln!(
                o,
                " {:<22} {:>9} {:>9} {:>9} {:>9}",
                format!("{} {}", st.role, st.fd_kind),
                st.latency.count,
                opt(st.latency.mean_seconds),
                opt(st.latency.p50_seconds),
                opt(st.latency.p99_seconds),
            );
        }
        let _ = writeln!(
            o,
            "\n {:<22} {:>9} {:>13} {:>9} {:>11}   processes",
            "thread time (role)", "on_cpu", "storage_wait", "ipc_wait", "other_wait"
        );
        state_rows(&mut o, "", &j.roles);
        if j.ranks.len() > 1 {
            for r in &j.ranks {
                state_rows(&mut o, &format!("rank {} ", r.rank), &r.roles);
            }
        }
        for v in &j.gpu_verdicts {
            let _ = writeln!(o, " {v}");
        }
    }
    let drops: u64 = s.dropped_events.values().sum();
    if drops == 0 {
        let _ = writeln!(o, "\n dropped events: none");
    } else {
        let list: Vec<String> = s
            .dropped_events
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(o, "\n dropped events: {}", list.join(", "));
    }
    if s.record_errors > 0 {
        let _ = writeln!(
            o,
            " record file: {} line(s) could not be written",
            s.record_errors
        );
    }
    if let Some(why) = &s.gpu_disabled {
        let _ = writeln!(o, " {why}");
    }
    o
}
