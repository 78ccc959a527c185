//! GPU sampling through NVML (`libnvidia-ml.so`, loaded at run time by `nvml-wrapper`).
//!
//! Utilization comes from NVML's sample buffer (`nvmlDeviceGetSamples` with
//! `NVML_GPU_UTILIZATION_SAMPLES`), not from the coarse one-second `nvmlDeviceGetUtilizationRates`:
//! the driver keeps a ring of samples (one every ~1/6 s on recent GPUs), each giving the percentage
//! of the time since the previous sample during which a kernel ran. Their timestamps are CPU
//! timestamps in microseconds on the realtime clock; they are converted to `CLOCK_MONOTONIC` with
//! the realtime-minus-monotonic offset measured at each poll.
//!
//! The same code loads the stand-in library of the tests (`--nvml-lib`), which reports the driver
//! version [`STANDIN_DRIVER`]: every figure is then labelled simulated.
//!
//! `poll` makes blocking driver calls (a few ms per GPU, plus ~20 ms per PCIe query, which is
//! therefore made at most once per [`PCIE_INTERVAL_NS`]); run it off any async executor thread.

use std::collections::{HashMap, HashSet};

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::enum_wrappers::device::{Clock, PcieUtilCounter, Sampling, TemperatureSensor};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::error::NvmlError;

use super::{GpuInfo, GpuReading, UtilSample};

/// A gap between two consecutive NVML samples longer than this (in µs) is a discontinuity (the
/// driver's ring buffer wrapped between polls, or sampling paused): the sample after the gap only
/// re-establishes the baseline instead of claiming the whole gap.
pub const MAX_SAMPLE_GAP_US: u64 = 5_000_000;

/// Minimum time between two PCIe throughput queries of one GPU (each blocks ~20 ms in NVML).
pub const PCIE_INTERVAL_NS: u64 = 1_000_000_000;

/// Bytes per NVML PCIe throughput unit ("KB/s"; NVML's KB are KiB).
const PCIE_UNIT_BYTES: f64 = 1024.0;

/// Clock throttle reasons reported in [`GpuReading::throttle_reasons`], with their metric names.
const THROTTLE_REASONS: [(ThrottleReasons, &str); 9] = [
    (ThrottleReasons::GPU_IDLE, "gpu_idle"),
    (
        ThrottleReasons::APPLICATIONS_CLOCKS_SETTING,
        "applications_clocks_setting",
    ),
    (ThrottleReasons::SW_POWER_CAP, "sw_power_cap"),
    (ThrottleReasons::HW_SLOWDOWN, "hw_slowdown"),
    (ThrottleReasons::SYNC_BOOST, "sync_boost"),
    (ThrottleReasons::SW_THERMAL_SLOWDOWN, "sw_thermal_slowdown"),
    (ThrottleReasons::HW_THERMAL_SLOWDOWN, "hw_thermal_slowdown"),
    (
        ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
        "hw_power_brake_slowdown",
    ),
    (
        ThrottleReasons::DISPLAY_CLOCK_SETTING,
        "display_clock_setting",
    ),
];

/// The driver version the stand-in NVML library of the tests reports.
pub const STANDIN_DRIVER: &str = "stallmon-standin";

/// A GPU named on the command line: NVML index or UUID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuSelector {
    Index(u32),
    Uuid(String),
}

impl std::str::FromStr for GpuSelector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty GPU name".into());
        }
        if let Ok(i) = s.parse() {
            return Ok(Self::Index(i));
        }
        if s.len() > 128 || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!("not a GPU index or UUID: {s:?}"));
        }
        Ok(Self::Uuid(s.to_string()))
    }
}

impl std::fmt::Display for GpuSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Index(i) => write!(f, "{i}"),
            Self::Uuid(u) => f.write_str(u),
        }
    }
}

/// How to reach NVML and which GPUs to sample.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// The NVML library (default: the driver's `libnvidia-ml.so.1` on the library path).
    pub lib_path: Option<std::path::PathBuf>,
    /// GPUs to sample (default: all).
    pub select: Option<Vec<GpuSelector>>,
}

/// Why GPU sampling is unavailable (the trace goes on without GPU attribution).
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "cannot initialize NVML ({0}): install the NVIDIA driver (libnvidia-ml.so.1) on GPU hosts, or point --nvml-lib at it"
    )]
    Init(NvmlError),
    #[error("cannot count GPUs: {0}")]
    Count(NvmlError),
    #[error("NVML reports no GPUs")]
    NoGpus,
    #[error("GPU {0} requested but NVML reports {1} GPU(s)")]
    NoSuchIndex(u32, u32),
    #[error("GPU {0} requested but no GPU has that UUID")]
    NoSuchUuid(String),
    #[error("NVML did not initialise within {0:?} (a hung driver?)")]
    InitTimeout(std::time::Duration),
    #[error("the NVML sampler thread: {0}")]
    Thread(String),
}

impl GpuError {
    /// The GPUs named with `--gpus` do not exist: the command line is wrong, not the host.
    pub fn is_bad_selection(&self) -> bool {
        matches!(self, Self::NoSuchIndex(..) | Self::NoSuchUuid(_))
    }
}

/// Samples GPUs through NVML.
pub struct NvmlSampler {
    nvml: Nvml,
    devices: Vec<DeviceState>,
    /// Realtime µs when the sampler was created: older buffered samples are not reported (they
    /// predate the monitored job), they only serve as the baseline of the first new one.
    start_us: u64,
    simulated: bool,
}

/// What the sampler remembers about one GPU between polls.
struct DeviceState {
    index: u32,
    /// Identity, cached after the first successful read.
    info: Option<GpuInfo>,
    /// NVML timestamp (µs) of the newest utilization sample seen.
    last_util_us: Option<u64>,
    /// NVML timestamp (µs) of the newest process utilization sample seen.
    last_proc_us: Option<u64>,
    pcie_rx: Integrator,
    pcie_tx: Integrator,
    /// Monotonic ns of the last PCIe query.
    pcie_at_ns: Option<u64>,
    /// Optional metrics already reported as unavailable (logged once each).
    warned: HashSet<&'static str>,
}

impl NvmlSampler {
    /// Initializes NVML and selects GPUs.
    pub fn new(opts: &GpuOptions) -> Result<Self, GpuError> {
        let mut builder = Nvml::builder();
        if let Some(p) = &opts.lib_path {
            builder.lib_path(p.as_os_str());
        }
        let nvml = builder.init().map_err(GpuError::Init)?;
        let count = nvml.device_count().map_err(GpuError::Count)?;
        if count == 0 {
            return Err(GpuError::NoGpus);
        }
        let simulated = nvml
            .sys_driver_version()
            .is_ok_and(|v| v.trim() == STANDIN_DRIVER);
        let mut indices: Vec<u32> = match &opts.select {
            None => (0..count).collect(),
            Some(list) => {
                let mut out = Vec::new();
                for sel in list {
                    out.push(match sel {
                        GpuSelector::Index(i) if *i < count => *i,
                        GpuSelector::Index(i) => return Err(GpuError::NoSuchIndex(*i, count)),
                        GpuSelector::Uuid(u) => (0..count)
                            .find(|&i| {
                                nvml.device_by_index(i)
                                    .and_then(|d| d.uuid())
                                    .is_ok_and(|x| x.eq_ignore_ascii_case(u))
                            })
                            .ok_or_else(|| GpuError::NoSuchUuid(u.clone()))?,
                    });
                }
                out
            }
        };
        indices.sort_unstable();
        indices.dedup();
        let start_us = super::realtime_ns() / 1000;
        let devices = indices
            .into_iter()
            .map(|index| DeviceState {
                index,
                info: None,
                last_util_us: None,
                last_proc_us: None,
                pcie_rx: Integrator::default(),
                pcie_tx: Integrator::default(),
                pcie_at_ns: None,
                warned: HashSet::new(),
            })
            .collect();
        Ok(Self {
            nvml,
            devices,
            start_us,
            simulated,
        })
    }

    /// NVML indices of the sampled GPUs.
    pub fn indices(&self) -> Vec<u32> {
        self.devices.iter().map(|d| d.index).collect()
    }

    /// `"nvml"`, or `"simulated"` for the stand-in library.
    pub fn source(&self) -> &'static str {
        if self.simulated { "simulated" } else { "nvml" }
    }

    /// Readings for every sampled GPU. Never fails as a whole: a GPU that errors is returned
    /// with [`GpuReading::stale`] set, and retried on the next poll.
    pub fn poll(&mut self) -> Vec<GpuReading> {
        let clock = ClockMap::now();
        let start_us = self.start_us;
        self.devices
            .iter_mut()
            .map(|state| poll_device(&self.nvml, state, &clock, start_us))
            .collect()
    }
}

/// One GPU's reading; errors become `stale` (for identity and utilization) or `None` gauges.
fn poll_device(nvml: &Nvml, st: &mut DeviceState, clock: &ClockMap, start_us: u64) -> GpuReading {
    let placeholder = || GpuInfo {
        index: st.index,
        ..GpuInfo::default()
    };
    let device = match nvml.device_by_index(st.index) {
        Ok(d) => d,
        Err(e) => {
            let mut r = GpuReading::empty(st.info.clone().unwrap_or_else(placeholder));
            r.stale = Some(format!("GPU {}: cannot open device: {e}", st.index));
            return r;
        }
    };
    if st.info.is_none() {
        match (device.uuid(), device.name()) {
            (Ok(uuid), Ok(model)) => {
                st.info = Some(GpuInfo {
                    index: st.index,
                    uuid,
                    model,
                    pci_bus_id: device.pci_info().map(|p| p.bus_id).unwrap_or_default(),
                    minor: device.minor_number().ok(),
                })
            }
            (Err(e), _) | (_, Err(e)) => {
                let mut r = GpuReading::empty(placeholder());
                r.stale = Some(format!("GPU {}: cannot read identity: {e}", st.index));
                return r;
            }
        }
    }
    let mut r = GpuReading::empty(st.info.clone().unwrap_or_else(placeholder));

    // Utilization samples: the data attribution depends on; failure marks the reading stale.
    match device.samples(Sampling::GpuUtilization, st.last_util_us) {
        Ok(raw) => {
            let raw: Vec<(u64, f64)> = raw
                .iter()
                .map(|s| (s.timestamp, sample_value(&s.value)))
                .collect();
            r.samples = convert_util_samples(&raw, &mut st.last_util_us, start_us, clock);
        }
        Err(NvmlError::NotFound) => {} // no new samples since the last poll
        Err(e) => r.stale = Some(format!("GPU {}: utilization samples: {e}", st.index)),
    }

    let index = st.index;
    let mut opt = |what: &'static str, res: Result<(), NvmlError>| {
        if let Err(e) = res
            && st.warned.insert(what)
        {
            tracing::info!("GPU {index}: {what} not available: {e}");
        }
    };

    opt(
        "memory info",
        device.memory_info().map(|m| {
            r.memory_used_bytes = Some(m.used);
            r.memory_total_bytes = Some(m.total);
        }),
    );
    opt(
        "temperature",
        device
            .temperature(TemperatureSensor::Gpu)
            .map(|t| r.temperature_c = Some(f64::from(t))),
    );
    opt(
        "power",
        device
            .power_usage()
            .map(|mw| r.power_w = Some(f64::from(mw) / 1000.0)),
    );
    opt(
        "SM clock",
        device
            .clock_info(Clock::SM)
            .map(|mhz| r.sm_clock_mhz = Some(mhz)),
    );
    opt(
        "throttle reasons",
        device.current_throttle_reasons().map(|bits| {
            r.throttle_reasons = THROTTLE_REASONS
                .iter()
                .map(|&(flag, name)| (name, bits.contains(flag)))
                .collect();
        }),
    );
    opt(
        "compute processes",
        device.running_compute_processes().map(|procs| {
            let mut pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
            pids.sort_unstable();
            pids.dedup();
            r.process_pids = pids;
        }),
    );
    match device.process_utilization_stats(st.last_proc_us) {
        Ok(samples) => {
            let mut latest: HashMap<u32, (u64, f64)> = HashMap::new();
            for s in samples {
                if st.last_proc_us.is_some_and(|last| s.timestamp <= last) {
                    continue;
                }
                st.last_proc_us = Some(st.last_proc_us.unwrap_or(0).max(s.timestamp));
                let util = (f64::from(s.sm_util) / 100.0).clamp(0.0, 1.0);
                let e = latest.entry(s.pid).or_insert((s.timestamp, util));
                if s.timestamp >= e.0 {
                    *e = (s.timestamp, util);
                }
            }
            let mut v: Vec<(u32, f64)> = latest.into_iter().map(|(p, (_, u))| (p, u)).collect();
            v.sort_unstable_by_key(|&(p, _)| p);
            r.process_sm_util = v;
        }
        Err(NvmlError::NotFound) => {}
        Err(e) => opt("process utilization", Err(e)),
    }

    // PCIe throughput: each query blocks ~20 ms in the driver, so it is rate-limited.
    let now_ns = clock.mono_ns;
    let due = st
        .pcie_at_ns
        .is_none_or(|t| now_ns.saturating_sub(t) >= PCIE_INTERVAL_NS);
    if due {
        st.pcie_at_ns = Some(now_ns);
        let rx = device.pcie_throughput(PcieUtilCounter::Receive);
        let tx = device.pcie_throughput(PcieUtilCounter::Send);
        match (rx, tx) {
            (Ok(rx), Ok(tx)) => {
                st.pcie_rx.add(now_ns, f64::from(rx) * PCIE_UNIT_BYTES);
                st.pcie_tx.add(now_ns, f64::from(tx) * PCIE_UNIT_BYTES);
            }
            (Err(e), _) | (_, Err(e)) => opt("PCIe throughput", Err(e)),
        }
    }
    r.pcie_rx_bytes = st.pcie_rx.total();
    r.pcie_tx_bytes = st.pcie_tx.total();
    r
}

/// The value of an NVML sample as a number (utilization samples are percentages).
fn sample_value(v: &SampleValue) -> f64 {
    match *v {
        SampleValue::F64(x) => x,
        SampleValue::U32(x) => f64::from(x),
        SampleValue::U64(x) => x as f64,
        SampleValue::I64(x) => x as f64,
    }
}

/// A realtime/monotonic clock pair taken at one instant, to map NVML timestamps.
#[derive(Clone, Copy, Debug)]
struct ClockMap {
    /// `CLOCK_REALTIME - CLOCK_MONOTONIC`, ns.
    offset_ns: i128,
    mono_ns: u64,
}

impl ClockMap {
    fn now() -> Self {
        let offset_ns = super::realtime_offset_ns();
        Self {
            offset_ns,
            mono_ns: super::monotonic_ns(),
        }
    }

    /// Monotonic ns of an NVML timestamp (µs). NVML documents these as CPU (realtime)
    /// timestamps; a value that is nearer to the monotonic clock than to the realtime clock is
    /// taken as monotonic already.
    fn to_monotonic_ns(self, ts_us: u64) -> u64 {
        let ts_ns = i128::from(ts_us) * 1000;
        let mono = i128::from(self.mono_ns);
        let real = mono + self.offset_ns;
        let converted = if (ts_ns - mono).abs() < (ts_ns - real).abs() {
            ts_ns
        } else {
            ts_ns - self.offset_ns
        };
        converted.clamp(0, i128::from(u64::MAX)) as u64
    }
}

/// Turns raw NVML utilization samples `(timestamp_us, percent)` into [`UtilSample`]s.
///
/// Each sample's period runs from the previous sample's timestamp to its own. `last_us` carries
/// the newest timestamp seen across polls. Samples older than `start_us`, the first sample ever
/// seen, and samples after a gap longer than [`MAX_SAMPLE_GAP_US`] only set the baseline.
fn convert_util_samples(
    raw: &[(u64, f64)],
    last_us: &mut Option<u64>,
    start_us: u64,
    clock: &ClockMap,
) -> Vec<UtilSample> {
    let mut raw = raw.to_vec();
    raw.sort_by_key(|&(ts, _)| ts);
    let mut out = Vec::with_capacity(raw.len());
    for (ts, percent) in raw {
        let prev = match *last_us {
            Some(prev) if ts <= prev => continue, // already seen
            prev => prev,
        };
        *last_us = Some(ts);
        let Some(prev) = prev else { continue };
        if ts < start_us || ts - prev > MAX_SAMPLE_GAP_US || !percent.is_finite() {
            continue;
        }
        let start_ns = clock.to_monotonic_ns(prev);
        let end_ns = clock.to_monotonic_ns(ts);
        if end_ns <= start_ns {
            continue;
        }
        out.push(UtilSample {
            end_ns,
            period_ns: end_ns - start_ns,
            util: (percent / 100.0).clamp(0.0, 1.0),
        });
    }
    out
}

/// Integrates a rate (per second) over time with the trapezoid rule.
#[derive(Clone, Copy, Debug, Default)]
struct Integrator {
    /// Time (ns) and rate of the previous point.
    last: Option<(u64, f64)>,
    total: f64,
}

impl Integrator {
    fn add(&mut self, now_ns: u64, rate: f64) {
        if let Some((t, prev)) = self.last {
            let dt = now_ns.saturating_sub(t) as f64 * 1e-9;
            self.total += (prev + rate) / 2.0 * dt;
        }
        self.last = Some((now_ns, rate));
    }

    /// The integral so far, or `None` before the first point.
    fn total(&self) -> Option<u64> {
        self.last.map(|_| self.total as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFSET_NS: i128 = 1_700_000_000_000_000_000; // realtime - monotonic

    fn clock() -> ClockMap {
        ClockMap {
            offset_ns: OFFSET_NS,
            mono_ns: 1_000_000_000_000, // 1000 s of uptime
        }
    }

    /// Realtime µs for a monotonic ns.
    fn real_us(mono_ns: u64) -> u64 {
        ((i128::from(mono_ns) + OFFSET_NS) / 1000) as u64
    }

    #[test]
    fn realtime_timestamps_map_to_monotonic() {
        let c = clock();
        assert_eq!(c.to_monotonic_ns(real_us(999_000_000_000)), 999_000_000_000);
        // A timestamp already on the monotonic clock is left alone.
        assert_eq!(c.to_monotonic_ns(999_000_000), 999_000_000_000);
    }

    #[test]
    fn samples_get_periods_from_gaps() {
        let c = clock();
        let t = |ms: u64| real_us(990_000_000_000 + ms * 1_000_000);
        let start_us = t(0);
        let mut last = None;
        // One sample before start (baseline only), then three at ~1/6 s, given out of order.
        let raw = [
            (t(167), 50.0),
            (t(0) - 100, 10.0),
            (t(333), 100.0),
            (t(500), 0.0),
        ];
        let s = convert_util_samples(&raw, &mut last, start_us, &c);
        assert_eq!(last, Some(t(500)));
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].end_ns, 990_167_000_000);
        assert_eq!(s[0].period_ns, 167_100_000);
        assert_eq!(s[0].util, 0.5);
        assert_eq!(s[1].period_ns, 166_000_000);
        assert_eq!(s[1].util, 1.0);
        assert_eq!(s[2].start_ns(), s[1].end_ns);
        assert_eq!(s[2].util, 0.0);

        // The next poll returns only newer samples; repeats are ignored.
        let raw = [(t(500), 0.0), (t(667), 250.0)];
        let s = convert_util_samples(&raw, &mut last, start_us, &c);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].period_ns, 167_000_000);
        assert_eq!(s[0].util, 1.0, "clamped");

        // A long gap (ring buffer wrapped) only re-establishes the baseline.
        let raw = [(t(60_000), 30.0), (t(60_167), 40.0)];
        let s = convert_util_samples(&raw, &mut last, start_us, &c);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].end_ns, 990_000_000_000 + 60_167_000_000);
    }

    #[test]
    fn first_sample_is_a_baseline() {
        let c = clock();
        let mut last = None;
        let s = convert_util_samples(&[(real_us(999_000_000_000), 70.0)], &mut last, 0, &c);
        assert!(s.is_empty());
        assert!(last.is_some());
    }

    #[test]
    fn integrator_is_trapezoid() {
        let mut i = Integrator::default();
        assert_eq!(i.total(), None);
        i.add(0, 100.0);
        assert_eq!(i.total(), Some(0));
        i.add(2_000_000_000, 300.0);
        assert_eq!(i.total(), Some(400));
    }

    #[test]
    fn init_without_driver_is_a_clear_error() {
        // On machines without the NVIDIA driver this must fail cleanly; with one, succeed.
        match NvmlSampler::new(&GpuOptions::default()) {
            Ok(s) => assert!(!s.indices().is_empty()),
            Err(e) => assert!(!e.to_string().contains('\n'), "{e}"),
        }
        let missing = GpuOptions {
            lib_path: Some("/nonexistent/libnvidia-ml.so.1".into()),
            select: None,
        };
        let e = NvmlSampler::new(&missing).err().expect("no library there");
        assert!(matches!(e, GpuError::Init(_)), "{e}");
    }

    #[test]
    fn selectors_parse() {
        assert_eq!("3".parse::<GpuSelector>(), Ok(GpuSelector::Index(3)));
        assert_eq!(
            "GPU-5afe0000-1111".parse::<GpuSelector>(),
            Ok(GpuSelector::Uuid("GPU-5afe0000-1111".into()))
        );
        assert!("GPU 1".parse::<GpuSelector>().is_err());
        assert!("".parse::<GpuSelector>().is_err());
    }
}
