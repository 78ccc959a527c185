//! docs/benchmarks.md, rendered from the summary alone (what summary.json holds is what the
//! page shows).
use std::{collections::BTreeSet, fmt::Write as _};

use super::{
    Variant,
    bpf_stats::{self, ProgStats},
    min_max,
    self_cost::SCRAPES,
    summary::{RoundsInfo, Summary},
    workloads::JOB_PROCESSES,
};

fn pct(x: Option<f64>) -> String {
    match x {
        Some(x) if x.is_finite() => format!("{:+.2}%", x * 100.0 + 0.0),
        _ => "n/a".into(),
    }
}

fn range_pct(xs: &[f64]) -> String {
    if xs.is_empty() {
        return "n/a".into();
    }
    let (lo, hi) = min_max(xs);
    format!("{} .. {}", pct(Some(lo)), pct(Some(hi)))
}

pub fn goals_table(s: &Summary) -> String {
    let mut out = String::from("| goal | measured | met |\n|---|---|---|\n");
    for g in &s.goals {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            g.goal,
            g.measured,
            if g.met { "✓" } else { "✗" }
        );
    }
    out
}

fn rounds_note(name: &str, r: &RoundsInfo) -> String {
    let (n, used) = (r.rounds, r.used.len());
    let clean = r
        .foreign_tracing_programs
        .iter()
        .filter(|&&f| f == 0)
        .count();
    if clean == n {
        format!("{name}: all {n} rounds free of other tracers")
    } else if used < n {
        format!("{name}: {used} of {n} rounds free of other tracers (only those count)")
    } else {
        format!(
            "{name}: fewer than 2 of {n} rounds free of other tracers (all count; numbers are suspect)"
        )
    }
}

/// A cell of the program tables: `ns/run (runs)`.
fn prog_cell(s: &ProgStats, name: &str) -> String {
    match s.get(name) {
        Some(c) => match c.ns_per_run() {
            Some(ns) => format!("{ns:.0} ({})", c.run_cnt),
            None => "- (0)".into(),
        },
        None => "".into(),
    }
}

pub fn results(s: &Summary) -> String {
    let mut out = String::new();
    let f = &s.fio;
    let _ = writeln!(
        out,
        "### 1. fio: 4 KiB random reads, O_DIRECT, psync, QD1 ({} rounds, medians)\n\n\
         | variant | IOPS | µs per I/O | CPU µs per I/O | overhead (time per I/O) | per-round range | CPU overhead |\n\
         |---|---:|---:|---:|---:|---:|---:|",
        f.rounds.used.len()
    );
    for v in Variant::ALL {
        let x = f.variants.get(v);
        let base = v == Variant::Baseline;
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.2} | {:.2} | {} | {} | {} |",
            x.label,
            x.median_iops,
            x.median_ns_per_io / 1e3,
            x.median_cpu_ns_per_io / 1e3,
            if base {
                "(baseline)".into()
            } else {
                pct(x.overhead_ratio)
            },
            range_pct(&x.ratio_per_round),
            if base {
                "(baseline)".into()
            } else {
                pct(x.cpu_overhead_ratio)
            },
        );
    }

    let l = &s.syscall_loop;
    let _ = writeln!(
        out,
        "\n### 2. Syscall loop: 4 KiB read(2) from the page cache ({} rounds × {} reads, medians)\n\n\
         | variant | ns per read | CPU ns per read | overhead (time per read) | per-round range | CPU overhead |\n\
         |---|---:|---:|---:|---:|---:|",
        l.rounds.used.len(),
        l.reads_per_run
    );
    for v in Variant::ALL {
        let x = l.variants.get(v);
        let base = v == Variant::Baseline;
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1} | {} | {} | {} |",
            x.label,
            x.median_ns_per_read,
            x.median_cpu_ns_per_read,
            if base {
                "(baseline)".into()
            } else {
                pct(x.overhead_ratio)
            },
            range_pct(&x.ratio_per_round),
            if base {
                "(baseline)".into()
            } else {
                pct(x.cpu_overhead_ratio)
            },
        );
    }

    let e = &s.e2e;
    let w = &e.workload;
    let _ = writeln!(
        out,
        "\n### 3. End to end: trainloop.py, {} workers, page-cache data ({} rounds × {:.0} s, medians)\n\n\
         {} files of {} KiB read whole (two `read(2)` each), {} ms of CPU \"decoding\" per file, \
         {} files per batch, {} ms \"GPU step\" per batch. A sample is a file.\n\n\
         | variant | batches/s | samples/s | fewer samples/s | per-round range |\n|---|---:|---:|---:|---:|",
        w.workers,
        e.rounds.used.len(),
        w.seconds,
        w.files,
        w.file_kib,
        w.cpu_ms_per_file,
        w.batch_files,
        w.gpu_ms
    );
    for v in Variant::E2E {
        let x = e.variants.get(v).expect("an e2e variant");
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.0} | {} | {} |",
            x.label,
            x.median_batches_per_second,
            x.median_samples_per_second,
            if v == Variant::Baseline {
                "(baseline)".into()
            } else {
                pct(x.throughput_loss_ratio)
            },
            range_pct(&x.loss_per_round),
        );
    }

    let b = &s.bpf_stats;
    let _ = writeln!(
        out,
        "\n### 4. BPF time from the kernel's counters (bpf_stats: run_time_ns / run_cnt)\n\n\
         One fio run ({} s) and one syscall loop in mix mode ({} read-family calls) per variant. \
         Floor on this machine (an empty bpftrace program on `syscalls:sys_enter_read`, same \
         counters): {:.0} ns per run.\n\n\
         | variant | BPF ns per fio I/O | BPF ns per read-family call | ns per program run, event-weighted mean |\n\
         |---|---:|---:|---:|",
        b.fio_runtime_seconds, b.loop_calls, b.floor_ns_per_run
    );
    for v in Variant::TRACERS {
        let x = b.variants.get(v).expect("a tracer variant");
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.1} | {} |",
            x.label,
            x.bpf_ns_per_fio_io,
            x.bpf_ns_per_syscall,
            x.weighted_mean_ns_per_run
                .map_or("-".into(), |m| format!("{m:.0}"))
        );
    }
    let stallmon: Vec<Variant> = Variant::TRACERS
        .into_iter()
        .filter(|v| v.stallmon().is_some())
        .collect();
    let merged: Vec<ProgStats> = stallmon
        .iter()
        .map(|&v| {
            let x = b.variants.get(v).expect("a tracer variant");
            bpf_stats::merge(&x.fio_programs, &x.loop_programs)
        })
        .collect();
    let names: BTreeSet<&String> = merged.iter().flat_map(|m| m.keys()).collect();
    let _ = writeln!(
        out,
        "\nstallmon per program, fio and syscall loop together: ns per run (runs); empty: not \
         attached.\n\n| program | {} |\n|---|{}",
        stallmon
            .iter()
            .map(|v| v.label())
            .collect::<Vec<_>>()
            .join(" | "),
        "---:|".repeat(stallmon.len())
    );
    for name in names {
        let cells: Vec<String> = merged.iter().map(|m| prog_cell(m, name)).collect();
        let _ = writeln!(out, "| `{name}` | {} |", cells.join(" | "));
    }
    let peer = &b.variants.peer;
    let _ = writeln!(
        out,
        "\nPeer (bpftrace, biolatency.bt), during fio:\n\n| program | ns per run (runs) |\n|---|---:|"
    );
    for name in peer.fio_programs.keys() {
        let _ = writeln!(
            out,
            "| `{name}` | {} |",
            prog_cell(&peer.fio_programs, name)
        );
    }

    let me = &s.self_cost;
    let _ = writeln!(
        out,
        "\n### 5. stallmon itself\n\n| measure | value |\n|---|---:|\n\
         | job | {} processes (python3 parent + children, each a 4 KiB pread every 50 ms) |\n\
         | `stallmon_tracked_processes` on /metrics | {} |\n\
         | CPU, share of one core (over {:.0} s, default mode, {} s interval, no GPU) | {:.3}% |\n\
         | peak RSS (VmHWM, after the scrapes) | {:.1} MiB |\n\
         | RSS at the end | {:.1} MiB |\n\
         | /metrics scrape latency, median ({} scrapes) | {:.3} ms |\n\
         | /metrics scrape latency, p99 | {:.3} ms |\n\
         | /metrics scrape latency, max | {:.3} ms |\n\
         | /metrics body size | {} bytes |",
        me.job_processes,
        me.tracked_processes_metric
            .map_or("n/a".into(), |x| format!("{x:.0}")),
        me.cpu_window_seconds,
        me.interval_seconds,
        me.cpu_fraction * 100.0,
        me.peak_rss_bytes as f64 / 1048576.0,
        me.rss_bytes as f64 / 1048576.0,
        me.scrape_seconds.len(),
        me.scrape_median_seconds * 1e3,
        me.scrape_p99_seconds * 1e3,
        me.scrape_max_seconds * 1e3,
        me.scrape_body_bytes,
    );
    out
}

pub fn render(s: &Summary) -> String {
    let env = &s.environment;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Benchmarks\n\n\
         _Generated by `{}` on {}; every run overwrites this file. The same numbers, and every \
         individual run, are in `target/bench/summary.json` (schema: `xtask/src/bench/summary.rs`)._\n\n\
         ## Machine\n\n| | |\n|---|---|",
        s.command, s.date
    );
    for fact in &env.machine {
        let _ = writeln!(out, "| {} | {} |", fact.name, fact.value);
    }
    let _ = writeln!(
        out,
        "| load average before / after | {} / {} |\n\
         | other tracers | {}; {}; {}; waited {:.0} s for them; at most {} of their programs seen |\n\
         | bpf_stats already enabled by someone else | {} |\n\
         | wall time of the benchmark | {:.0} s |\n",
        env.loadavg_before,
        env.loadavg_after,
        rounds_note("fio", &s.fio.rounds),
        rounds_note("syscall loop", &s.syscall_loop.rounds),
        rounds_note("end to end", &s.e2e.rounds),
        env.waited_for_other_tracers_seconds,
        env.foreign_tracing_programs_max_seen,
        if env.bpf_stats_enabled_by_someone_else {
            "yes (ratios include its cost)"
        } else {
            "no"
        },
        env.elapsed_seconds
    );
    let _ = writeln!(
        out,
        "Command: `{}` (as root; it builds `target/release/stallmon` first). `--quick` is the \
         CI smoke-test version: fewer and shorter rounds, same structure.\n",
        s.command
    );
    let _ = writeln!(out, "## Goals\n\n{}", goals_table(s));
    let _ = writeln!(out, "## Results\n\n{}", results(s));
    let w = &s.e2e.workload;
    let _ = writeln!(
        out,
        "Why missed goals are missed, and what was changed to reach the others: \
         [performance.md](performance.md).\n\n## Method\n\n\
- **Variants.** (a) no tracer; (b) `stallmon trace -- <workload>` in its default mode (no \
syscall tracepoint: read stalls are measured at the context switch); (c) `stallmon trace --pid \
<a sleep>` while the workload runs untraced; (d) and (e) the same with `--syscalls` (the raw \
`sys_enter`/`sys_exit` tracepoints, exact per-call read latency); (f) the peer, `bpftrace \
xtask/bench/biolatency.bt` (block_rq_issue/complete classic tracepoints keyed by dev+sector, log2 \
histogram). stallmon runs with `--no-gpu` (\"NVML absent\" holds on every machine), and is ready \
(its `--ready-file` written) before the workload's own measurement starts; its start-up, loading \
and verifying its programs, is not measured.\n\
- **Interleaved and repeated.** Each round runs every variant once, in an order rotated from \
round to round; a variant's overhead is computed per round against the same round's baseline \
(`variant / baseline - 1` on time per unit of work, so +1% means 1% slower; end to end, \
`1 - variant / baseline` on samples per second, so +1% means 1% fewer samples), and the reported \
figure is the median over rounds. \"Per-round range\" shows the spread; for the baseline it is \
the spread of the baseline itself around its median, i.e. the noise floor of this machine. A \
ratio inside that range is not distinguishable from zero. Rounds during which another process \
had tracing programs attached are left out when at least two clean rounds remain.\n\
- **fio** (phase 1): `fio --rw=randread --bs=4k --direct=1 --ioengine=psync --iodepth=1 \
--time_based --runtime={rt}s --ramp_time={ramp}ms` on a {mib} MiB file under `target/bench/`, \
plus one unmeasured warm-up. Time per I/O is 1/IOPS; CPU per I/O is fio's usr+sys CPU share \
times its runtime, divided by the I/O count.\n\
- **Syscall loop** (phase 2): `xtask/bench/readloop.c`, compiled at bench time, reads a {cmib} \
MiB file once into the page cache, then times {reads} `read(2)` calls of 4 KiB inside the \
process (wall and getrusage CPU of the loop only).\n\
- **End to end** (phase 3): `tests/workloads/trainloop.py --workers {workers} --files {files} \
--file-kib {kib} --batch-files {bf} --cpu-ms {cpu} --gpu-ms {gpu} --seconds {secs}` on a dataset \
read into the page cache beforehand: worker processes read whole files and burn CPU per file \
(\"decoding\"), the feeder takes batches from a queue. Samples per second = batches × files per \
batch / the job's own wall time (`t1 - t0` of its `--truth` file: from the script's first \
statement to its end, start-up and shutdown of the workers included).\n\
- **BPF time** (phase 4): `BPF_ENABLE_STATS` (the same switch as `sysctl \
kernel.bpf_stats_enabled=1`) is on during this phase only, because the counters cost two clock \
reads per program run themselves. Counters are read from `/proc/<tracer>/fdinfo` of each \
program descriptor (run_time_ns, run_cnt), before and after the workload; names are the attach \
points (the link's `tp_name`, or `bpftool perf show` for the peer's perf-event attachments). \
Traced variants start the workload as stallmon's job (which then waits, so that the counters can \
be read before stallmon exits); untraced ones trace a `sleep`. The syscall loop runs in mix \
mode (read, pread64, readv, preadv, preadv2 in turn). \"BPF ns per fio I/O\" is every program's \
run time during fio over fio's I/O count (context switches, block layer and syscalls of the whole \
machine in that window included); the event-weighted mean is Σ run_time_ns / Σ run_cnt over \
every program of both workloads (the former \"median over programs\" was dominated by programs \
that run a handful of times). These counters time the program body only: not the tracepoint's \
own dispatch, nor the syscall-entry slow path that every syscall of every task takes while a \
syscall tracepoint is attached (`--syscalls`); that part shows only in the ratios of phases 1-3.\n\
- **stallmon itself** (phase 5): `stallmon trace --no-gpu -- python3 -c <job>` (default mode, \
1 s interval), job = {procs} processes. CPU share = utime+stime from `/proc/<pid>/stat` over a \
{self_s} s window that starts after start-up and after the job has forked, with no scrapes in \
it. Then {scrapes} sequential `GET /metrics` over fresh HTTP/1.0 connections, 5 ms apart \
(latency = connect to last byte), then peak RSS = `VmHWM` from `/proc/<pid>/status`.\n\
- **Noise.** The machine may be shared (see the load average and foreign tracing programs \
above); all processes started by the benchmark are killed on exit, error or not.",
        rt = s.fio.runtime_seconds,
        ramp = s.fio.ramp_ms,
        mib = s.fio.file_mib,
        cmib = s.syscall_loop.file_mib,
        reads = s.syscall_loop.reads_per_run,
        workers = w.workers,
        files = w.files,
        kib = w.file_kib,
        bf = w.batch_files,
        cpu = w.cpu_ms_per_file,
        gpu = w.gpu_ms,
        secs = w.seconds,
        procs = JOB_PROCESSES,
        self_s = s.self_cost.cpu_window_seconds.round(),
        scrapes = SCRAPES,
    );
    out
}
