//! GPU sampling through NVML: one code path, whether the library is the NVIDIA driver's or the
//! stand-in that CI uses (`tests/nvml-standin`, loaded with `--nvml-lib`; everything it reports
//! is labelled simulated).
//!
//! The [`NvmlSampler`] is polled every interval, on its own thread ([`Sampler`]). Each poll returns one [`GpuReading`] per GPU
//! with the utilization samples that became available since the previous poll, plus
//! point-in-time gauges (memory, temperature, power, clocks, PCIe, throttling) and the
//! processes holding a compute context.
//!
//! All timestamps are `CLOCK_MONOTONIC` nanoseconds: the clock of `bpf_ktime_get_ns` and of
//! Python's `time.monotonic_ns()`, so GPU samples line up with the kernel's thread-state events.

pub mod nvml;
pub mod worker;

pub use nvml::{GpuError, GpuOptions, GpuSelector, NvmlSampler};
pub use worker::{Polled, Sampler};

/// How long NVML may take to initialise before stallmon goes on without GPUs.
pub const INIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Identity of one GPU, with dcgm-exporter's meanings: NVML index (`gpu`), `UUID`,
/// `modelName`, `pci_bus_id`, and the device file (`device`, e.g. `nvidia0`, from the minor
/// number). Join with other GPU exporters on the UUID: indexes are not stable across reboots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    /// Product name, e.g. "NVIDIA H100 80GB HBM3".
    pub model: String,
    pub pci_bus_id: String,
    pub minor: Option<u32>,
}

impl GpuInfo {
    /// The device file name dcgm-exporter puts in its `device` label (`nvidia<minor>`).
    pub fn device(&self) -> String {
        self.minor.map(|m| format!("nvidia{m}")).unwrap_or_default()
    }
}

/// One utilization sample: the fraction of `[end_ns - period_ns, end_ns)` during which a kernel
/// ran on the GPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UtilSample {
    /// End of the sample period, `CLOCK_MONOTONIC` ns.
    pub end_ns: u64,
    /// Length of the sample period in ns.
    pub period_ns: u64,
    /// Busy fraction in `[0, 1]`.
    pub util: f64,
}

impl UtilSample {
    /// Start of the sample period (`end_ns - period_ns`, saturating at 0).
    pub fn start_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.period_ns)
    }
}

/// Everything one poll learned about one GPU. Gauges are `None` when the GPU does not support
/// them or the query failed.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuReading {
    pub info: GpuInfo,
    /// Utilization samples new since the previous poll, in time order, contiguous where the
    /// source allows.
    pub samples: Vec<UtilSample>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_c: Option<f64>,
    pub power_w: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    /// Cumulative PCIe bytes received by the GPU (host to device), an estimate integrated from
    /// NVML's instantaneous throughput.
    pub pcie_rx_bytes: Option<u64>,
    /// Cumulative PCIe bytes sent by the GPU (device to host), estimated likewise.
    pub pcie_tx_bytes: Option<u64>,
    /// Every known clock throttle reason and whether it is active now (empty when unsupported).
    pub throttle_reasons: Vec<(&'static str, bool)>,
    /// Pids of the processes holding a compute context on this GPU.
    pub process_pids: Vec<u32>,
    /// Latest SM utilization per process (pid, fraction in `[0, 1]`), for processes that used
    /// the GPU since the previous poll.
    pub process_sm_util: Vec<(u32, f64)>,
    /// Error text when this GPU failed this poll (its data are missing or partial); the sampler
    /// keeps retrying on later polls.
    pub stale: Option<String>,
}

impl GpuReading {
    /// A reading with no samples and no gauges.
    pub fn empty(info: GpuInfo) -> Self {
        Self {
            info,
            samples: Vec::new(),
            memory_used_bytes: None,
            memory_total_bytes: None,
            temperature_c: None,
            power_w: None,
            sm_clock_mhz: None,
            pcie_rx_bytes: None,
            pcie_tx_bytes: None,
            throttle_reasons: Vec::new(),
            process_pids: Vec::new(),
            process_sm_util: Vec::new(),
            stale: None,
        }
    }
}

/// Reads a clock in nanoseconds (0 if the call fails, which it cannot for these clocks).
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes to it.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Now, on `CLOCK_MONOTONIC` (the clock of `bpf_ktime_get_ns` and of Python's
/// `time.monotonic_ns()`), in ns.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Now, on `CLOCK_REALTIME`, in ns since the Unix epoch.
pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

/// `CLOCK_REALTIME - CLOCK_MONOTONIC` in ns, measured now. The monotonic clock is read on both
/// sides of the realtime read and averaged, so the error is half the (sub-microsecond) gap.
pub fn realtime_offset_ns() -> i128 {
    let m0 = monotonic_ns();
    let r = realtime_ns();
    let m1 = monotonic_ns();
    let mid = (u128::from(m0) + u128::from(m1)) / 2;
    i128::from(r) - mid as i128
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_are_sane() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
        // Realtime is well past 2020 and ahead of monotonic (uptime).
        assert!(realtime_ns() > 1_577_836_800_000_000_000);
        assert!(realtime_offset_ns() > 0);
    }

    #[test]
    fn sample_start_saturates() {
        let s = UtilSample {
            end_ns: 5,
            period_ns: 10,
            util: 0.5,
        };
        assert_eq!(s.start_ns(), 0);
    }
}
