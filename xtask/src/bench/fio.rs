//! Phase 1: fio, 4 KiB random reads, O_DIRECT, psync, QD1, on a file under target/bench: IOPS,
//! time per I/O (1/IOPS) and CPU time per I/O, under every [`Variant`].
use std::{fs, path::Path, thread, time::Duration};

use anyhow::{Context, Result, anyhow, ensure};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Bench, Rounds, Variant, workloads::FIO_FILE_MIB};

/// One fio run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FioRun {
    pub iops: f64,
    /// Wall time per I/O (1 / IOPS), ns.
    pub ns_per_io: f64,
    /// fio's usr+sys CPU time per I/O, ns.
    pub cpu_ns_per_io: f64,
    pub ios: u64,
}

impl Bench {
    /// fio's command line (`fio` first).
    pub fn fio_argv(&self, runtime_s: u32, ramp_ms: u32, out: &Path) -> Vec<String> {
        vec![
            "fio".into(),
            "--name=stallmon-bench".into(),
            format!("--filename={}", self.fio_file.display()),
            format!("--size={FIO_FILE_MIB}M"),
            "--rw=randread".into(),
            "--bs=4k".into(),
            "--direct=1".into(),
            "--ioengine=psync".into(),
            "--iodepth=1".into(),
            "--numjobs=1".into(),
            "--time_based".into(),
            format!("--runtime={runtime_s}"),
            format!("--ramp_time={ramp_ms}ms"),
            "--output-format=json".into(),
            format!("--output={}", out.display()),
        ]
    }

    pub fn fio_timeout(runtime_s: u32) -> Duration {
        Duration::from_secs(runtime_s as u64 + 120)
    }

    pub fn phase_fio(&mut self) -> Result<Rounds<FioRun>> {
        // Warm-up (not counted): the device, the host's cache, fio's file layout.
        self.fio_once(Variant::Baseline, 1, 0, "warmup")?;
        let (rounds, rt, ramp) = (
            self.cfg.fio_rounds,
            self.cfg.fio_runtime_s,
            self.cfg.fio_ramp_ms,
        );
        self.interleaved(
            "fio",
            &Variant::ALL,
            rounds,
            Duration::from_millis(300),
            |b, v, r| b.fio_once(v, rt, ramp, &format!("{}-{r}", v.key())),
            |run| {
                format!(
                    "{:>8.0} IOPS {:>7.2} us/IO, CPU {:>6.2} us/IO",
                    run.iops,
                    run.ns_per_io / 1e3,
                    run.cpu_ns_per_io / 1e3
                )
            },
        )
    }

    fn fio_once(&self, v: Variant, runtime_s: u32, ramp_ms: u32, tag: &str) -> Result<FioRun> {
        let out = self.dir.join(format!("fio-{tag}.json"));
        let _ = fs::remove_file(&out);
        let argv = self.fio_argv(runtime_s, ramp_ms, &out);
        self.under(v, &argv, Self::fio_timeout(runtime_s))?;
        // Let the block layer settle between runs.
        thread::sleep(Duration::from_millis(50));
        parse_fio(&out)
    }
}

pub fn parse_fio(path: &Path) -> Result<FioRun> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // fio may print warnings before the JSON document.
    let start = text
        .find('{')
        .ok_or_else(|| anyhow!("no JSON in {}", path.display()))?;
    let v: Value = serde_json::from_str(&text[start..])
        .with_context(|| format!("parsing {}", path.display()))?;
    let job = &v["jobs"][0];
    let num = |x: &Value, what: &str| {
        x.as_f64()
            .ok_or_else(|| anyhow!("fio output {} lacks {what}", path.display()))
    };
    let iops = num(&job["read"]["iops"], "read.iops")?;
    let ios = num(&job["read"]["total_ios"], "read.total_ios")?;
    let runtime_ms = num(&job["job_runtime"], "job_runtime")?;
    let cpu_pct = num(&job["usr_cpu"], "usr_cpu")? + num(&job["sys_cpu"], "sys_cpu")?;
    ensure!(
        iops > 0.0 && ios > 0.0 && runtime_ms > 0.0,
        "fio did no I/O ({})",
        path.display()
    );
    Ok(FioRun {
        iops,
        ns_per_io: 1e9 / iops,
        cpu_ns_per_io: cpu_pct / 100.0 * runtime_ms * 1e6 / ios,
        ios: ios as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_output() {
        let dir = std::env::temp_dir().join(format!("xtask-fio-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("out.json");
        fs::write(
            &p,
            "fio: note\n{\"jobs\":[{\"read\":{\"iops\":8000.0,\"total_ios\":24000},\
             \"job_runtime\":3000,\"usr_cpu\":10.0,\"sys_cpu\":30.0}]}",
        )
        .unwrap();
        let r = parse_fio(&p).unwrap();
        assert_eq!(r.ios, 24000);
        assert_eq!(r.ns_per_io, 125_000.0);
        assert_eq!(r.cpu_ns_per_io, 0.4 * 3e9 / 24000.0);
        fs::write(&p, "{\"jobs\":[{\"read\":{\"iops\":0}}]}").unwrap();
        assert!(parse_fio(&p).is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
