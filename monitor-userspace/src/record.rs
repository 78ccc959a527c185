//! The record file: JSON lines for offline analysis (`stallmon report`). One `header` line, then
//! per interval one `interval` line with per-process and per-role deltas, the attribution inputs
//! (`feeder`, `worker_slice`, `gpu` lines), and a final `summary` line. Flushed every interval,
//! so a killed tracer loses at most one interval.
use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use anyhow::{Context, Result};
use monitor_common::{NUM_FD_KINDS, NUM_STATES, ROLE_NAMES};
use serde::Serialize;
use serde_json::json;

use crate::collector::Snapshot;

pub struct Recorder {
    out: BufWriter<File>,
}

#[derive(Serialize)]
struct ProcDelta<'a> {
    pid: u32,
    role: &'static str,
    parent: u32,
    comm: &'a str,
    exited: bool,
    state_ns: [u64; NUM_STATES],
    read_count: [u64; NUM_FD_KINDS],
    read_bytes: [u64; NUM_FD_KINDS],
    read_ns: [u64; NUM_FD_KINDS],
    blk_bytes: u64,
}

fn sub<const N: usize>(a: [u64; N], b: Option<[u64; N]>) -> [u64; N] {
    let b = b.unwrap_or([0; N]);
    std::array::from_fn(|i| a[i].saturating_sub(b[i]))
}

impl Recorder {
    pub fn create(path: &Path) -> Result<Self> {
        let f = File::create(path)
            .with_context(|| format!("cannot create record file {}", path.display()))?;
        Ok(Self {
            out: BufWriter::new(f),
        })
    }

    pub fn line<T: Serialize>(&mut self, v: &T) -> Result<()> {
        serde_json::to_writer(&mut self.out, v)?;
        self.out.write_all(b"\n")?;
        Ok(())
    }

    /// Per-process and per-role deltas between two snapshots.
    pub fn interval(&mut self, prev: Option<&Snapshot>, cur: &Snapshot) -> Result<()> {
        let mut procs = Vec::new();
        for p in cur.procs.values() {
            let before = prev.and_then(|s| s.procs.get(&p.pid));
            if before.is_some_and(|b| b.exited) {
                continue; // already reported as exited
            }
            procs.push(ProcDelta {
                pid: p.pid,
                role: ROLE_NAMES.get(p.role as usize).copied().unwrap_or("worker"),
                parent: p.parent,
                comm: &p.comm,
                exited: p.exited,
                state_ns: sub(p.state_ns, before.map(|b| b.state_ns)),
                read_count: sub(p.read_count, before.map(|b| b.read_count)),
                read_bytes: sub(p.read_bytes, before.map(|b| b.read_bytes)),
                read_ns: sub(p.read_ns, before.map(|b| b.read_ns)),
                blk_bytes: p
                    .blk_bytes
                    .saturating_sub(before.map_or(0, |b| b.blk_bytes)),
            });
        }
        let mut roles = BTreeMap::new();
        for (r, name) in ROLE_NAMES.iter().enumerate() {
            let c = &cur.roles[r];
            let b = prev.map(|s| &s.roles[r]);
            roles.insert(
                *name,
                json!({
                    "state_ns": sub(c.state_ns, b.map(|b| b.state_ns)),
                    "read_bytes": sub(c.read.map(|x| x.bytes), b.map(|b| b.read.map(|x| x.bytes))),
                    "read_count": sub(c.read.map(|x| x.count), b.map(|b| b.read.map(|x| x.count))),
                    "processes": c.processes,
                }),
            );
        }
        let mut block = Vec::new();
        for ((dev, op), c) in &cur.block {
            let b = prev.and_then(|s| s.block.get(&(dev.clone(), op.clone())));
            let lat = c.latency.since(&b.map(|b| b.latency).unwrap_or_default());
            block.push(json!({
                "device": dev, "op": op,
                "requests": c.count - b.map_or(0, |b| b.count),
                "bytes": c.bytes - b.map_or(0, |b| b.bytes),
                "latency_p50_s": lat.quantile(0.5),
                "latency_p99_s": lat.quantile(0.99),
            }));
        }
        let line = json!({
            "type": "interval",
            "mono_ns": cur.mono_ns,
            "dt_ns": prev.map_or(0, |p| cur.mono_ns.saturating_sub(p.mono_ns)),
            "roles": roles,
            "block": block,
            "procs": procs,
            "drops": cur.drops,
        });
        self.line(&line)?;
        self.flush()
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().context("writing the record file")
    }
}
