//! Stand-in GPUs: a scenario directory for the stand-in NVML library (`tests/nvml-standin`,
//! whose `lib.rs` documents the contract) and the flags and environment that make stallmon load
//! it. The workloads drive it (`tests/workloads/standin_gpu.py`).
use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
};

use crate::{repo_root, scratch_dir};

/// The stand-in library, built by `cargo xtask test` (`cargo build -p nvml-standin`).
pub fn standin_lib() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let p = target.join("debug/libnvml_standin.so");
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo xtask test` does: cargo build -p nvml-standin)",
        p.display()
    );
    p
}

/// A scenario directory with `gpus` simulated GPUs.
pub struct StandinGpus {
    pub dir: PathBuf,
    lib: PathBuf,
}

impl StandinGpus {
    /// A fresh scenario under `target/test-data/<name>` (sample period and publication lag in
    /// ms, see the contract).
    pub fn new(name: &str, gpus: u32, period_ms: u64, lag_ms: u64) -> Self {
        let dir = scratch_dir(&format!("gpus-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let list: Vec<serde_json::Value> = (0..gpus)
            .map(|i| {
                serde_json::json!({
                    "uuid": format!("GPU-5afe{i:04x}-0000-4000-8000-00000000{i:04x}"),
                    "name": "Stallmon Simulated GPU",
                    "pci_bus_id": format!("00000000:{:02X}:00.0", 0x3b + i),
                })
            })
            .collect();
        let scenario = serde_json::json!({
            "gpus": list,
            "sample_period_ms": period_ms,
            "lag_ms": lag_ms,
        });
        std::fs::write(dir.join("scenario.json"), scenario.to_string()).unwrap();
        for i in 0..gpus {
            std::fs::create_dir_all(dir.join(format!("gpu{i}"))).unwrap();
        }
        Self {
            dir,
            lib: standin_lib(),
        }
    }

    /// The UUID of GPU `i`.
    pub fn uuid(i: u32) -> String {
        format!("GPU-5afe{i:04x}-0000-4000-8000-00000000{i:04x}")
    }

    /// stallmon's flags to load the stand-in.
    pub fn args(&self) -> Vec<String> {
        vec!["--nvml-lib".into(), self.lib.display().to_string()]
    }

    /// The environment stallmon needs to find the scenario.
    pub fn env(&self) -> [(&'static str, &OsStr); 1] {
        [("STALLMON_STANDIN_DIR", self.dir.as_os_str())]
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Lets a zombie keep its contexts until it is reaped, as a real driver may still list an
    /// exiting process's context for a moment. Before stallmon starts (read at init).
    pub fn keep_zombie_contexts(&self) {
        let path = self.dir.join("scenario.json");
        let mut scenario: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        scenario["zombie_contexts"] = true.into();
        std::fs::write(&path, scenario.to_string()).unwrap();
    }

    /// Makes NVML calls on GPU `i` fail with `error` (e.g. `GPU_IS_LOST`).
    pub fn set_error(&self, i: u32, error: &str) {
        std::fs::write(self.dir.join(format!("gpu{i}/error")), error).unwrap();
    }

    /// Makes every driver call on GPU `i` take `ms` milliseconds (0: answer at once).
    pub fn set_delay(&self, i: u32, ms: u64) {
        std::fs::write(self.dir.join(format!("gpu{i}/delay")), ms.to_string()).unwrap();
    }
}
