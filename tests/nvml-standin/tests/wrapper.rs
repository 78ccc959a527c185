//! Drives the built `libnvml_standin.so` through `nvml-wrapper`, the way stallmon loads NVML.
//!
//! One test function: the library's state is process-wide (and the environment variable it
//! reads too), so the steps must not run concurrently.

use std::ffi::{CStr, CString, c_char, c_uint, c_ulonglong, c_void};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::enum_wrappers::device::{Clock, PcieUtilCounter, Sampling, TemperatureSensor};
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::Sample;
use nvml_wrapper_sys::bindings as sys;

const MS: u64 = 1_000_000;
const PERIOD_MS: u64 = 50;
const LAG_MS: u64 = 100;
const P: u64 = PERIOD_MS * MS;
const GIB: u64 = 1 << 30;
const UUID0: &str = "GPU-5afe0000-aaaa-4000-8000-000000000001";
const UUID1_DEFAULT: &str = "GPU-5afe0000-0000-4000-8000-000000000001";

/// `target/<profile>/libnvml_standin.so`, from `target/<profile>/deps/wrapper-<hash>`.
fn lib_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let candidates = [deps.parent().unwrap(), deps].map(|d| d.join("libnvml_standin.so"));
    candidates
        .iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("libnvml_standin.so not found at {candidates:?}"))
        .clone()
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// `CLOCK_REALTIME - CLOCK_MONOTONIC`, ns.
fn offset_ns() -> i128 {
    let m0 = mono_ns();
    let r = clock_ns(libc::CLOCK_REALTIME);
    let m1 = mono_ns();
    i128::from(r) - (i128::from(m0) + i128::from(m1)) / 2
}

fn realtime_us_now() -> u64 {
    clock_ns(libc::CLOCK_REALTIME) / 1000
}

fn sleep_until_mono(t_ns: u64) {
    let now = mono_ns();
    if t_ns > now {
        std::thread::sleep(Duration::from_nanos(t_ns - now));
    }
}

/// A scratch directory removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!(
            "nvml-standin-wrapper-{}-{}",
            std::process::id(),
            mono_ns()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn append(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Replaces `path` (creating its directory).
fn write_file(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Direct access to the library's C functions, for what `nvml-wrapper` does not expose. Holding
/// this handle also keeps the library loaded between the wrapper's `dlopen`/`dlclose` pairs.
struct Raw(*mut c_void);

impl Raw {
    fn open(path: &Path) -> Self {
        let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid C string.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!h.is_null(), "dlopen {path:?} failed");
        Self(h)
    }

    fn sym(&self, name: &CStr) -> *mut c_void {
        // SAFETY: valid handle and C string.
        let p = unsafe { libc::dlsym(self.0, name.as_ptr()) };
        assert!(!p.is_null(), "{name:?} not exported");
        p
    }

    fn error_string(&self, code: c_uint) -> String {
        type F = unsafe extern "C" fn(c_uint) -> *const c_char;
        // SAFETY: the symbol has this signature; it returns a static C string.
        unsafe {
            let f: F = std::mem::transmute(self.sym(c"nvmlErrorString"));
            CStr::from_ptr(f(code)).to_string_lossy().into_owned()
        }
    }

    fn handle(&self, index: c_uint) -> sys::nvmlDevice_t {
        type F = unsafe extern "C" fn(c_uint, *mut sys::nvmlDevice_t) -> c_uint;
        let mut dev: sys::nvmlDevice_t = std::ptr::null_mut();
        // SAFETY: the symbol has this signature.
        let rc = unsafe {
            let f: F = std::mem::transmute(self.sym(c"nvmlDeviceGetHandleByIndex_v2"));
            f(index, &mut dev)
        };
        assert_eq!(rc, 0);
        dev
    }

    /// (garbage, late) line counts of a GPU.
    fn line_counts(&self, index: c_uint) -> (u64, u64) {
        type F =
            unsafe extern "C" fn(sys::nvmlDevice_t, *mut c_ulonglong, *mut c_ulonglong) -> c_uint;
        let dev = self.handle(index);
        let (mut garbage, mut late) = (0, 0);
        // SAFETY: the symbol has this signature.
        let rc = unsafe {
            let f: F = std::mem::transmute(self.sym(c"stallmonStandinGetLineCounts"));
            f(dev, &mut garbage, &mut late)
        };
        assert_eq!(rc, 0);
        (garbage, late)
    }

    /// Calls `nvmlDeviceGetSamples` with a buffer of `capacity` (or none): (rc, count, samples).
    fn samples(
        &self,
        index: c_uint,
        last_seen: u64,
        capacity: Option<u32>,
    ) -> (c_uint, u32, Vec<(u64, f64)>) {
        type F = unsafe extern "C" fn(
            sys::nvmlDevice_t,
            sys::nvmlSamplingType_t,
            c_ulonglong,
            *mut sys::nvmlValueType_t,
            *mut c_uint,
            *mut sys::nvmlSample_t,
        ) -> c_uint;
        let dev = self.handle(index);
        let mut val_type = 77;
        let mut count = capacity.unwrap_or(0);
        // SAFETY: all-zero is a valid nvmlSample_t.
        let mut buf: Vec<sys::nvmlSample_t> =
            vec![unsafe { std::mem::zeroed() }; capacity.unwrap_or(0) as usize];
        let ptr = match capacity {
            Some(_) => buf.as_mut_ptr(),
            None => std::ptr::null_mut(),
        };
        // SAFETY: the symbol has this signature; the buffer holds `count` samples.
        let rc = unsafe {
            let f: F = std::mem::transmute(self.sym(c"nvmlDeviceGetSamples"));
            f(
                dev,
                sys::nvmlSamplingType_enum_NVML_GPU_UTILIZATION_SAMPLES,
                last_seen,
                &mut val_type,
                &mut count,
                ptr,
            )
        };
        assert_eq!(val_type, sys::nvmlValueType_enum_NVML_VALUE_TYPE_DOUBLE);
        let got = buf
            .iter()
            .take(if capacity.is_some() {
                count as usize
            } else {
                0
            })
            // SAFETY: the value type is double.
            .map(|s| (s.timeStamp, unsafe { s.sampleValue.dVal }))
            .collect();
        (rc, count, got)
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        // SAFETY: handle from dlopen.
        unsafe { libc::dlclose(self.0) };
    }
}

fn init(lib: &Path) -> Result<Nvml, NvmlError> {
    Nvml::builder().lib_path(lib.as_os_str()).init()
}

fn percent(s: &Sample) -> f64 {
    match s.value {
        SampleValue::F64(v) => v,
        ref other => panic!("utilization sample is not a double: {other:?}"),
    }
}

#[test]
fn nvml_wrapper_drives_the_standin() {
    let lib = lib_path();
    let raw = Raw::open(&lib);
    let tmp = TempDir::new();
    let dir = &tmp.0;

    // --- Init fails cleanly without a scenario ---------------------------------------------
    // SAFETY: this test binary has a single test, so no other thread reads the environment.
    unsafe { std::env::remove_var("STALLMON_STANDIN_DIR") };
    assert!(matches!(init(&lib).err(), Some(NvmlError::LibraryNotFound)));
    let msg = raw.error_string(sys::nvmlReturn_enum_NVML_ERROR_LIBRARY_NOT_FOUND);
    assert!(msg.contains("STALLMON_STANDIN_DIR is not set"), "{msg}");
    // SAFETY: as above.
    unsafe { std::env::set_var("STALLMON_STANDIN_DIR", dir) };
    assert!(matches!(init(&lib).err(), Some(NvmlError::LibraryNotFound)));
    std::fs::write(
        dir.join("scenario.json"),
        r#"{"gpus": [{"colour": "red"}]}"#,
    )
    .unwrap();
    assert!(matches!(init(&lib).err(), Some(NvmlError::Uninitialized)));
    let msg = raw.error_string(sys::nvmlReturn_enum_NVML_ERROR_UNINITIALIZED);
    assert!(msg.contains("colour"), "{msg}");

    // --- A two-GPU scenario ----------------------------------------------------------------
    std::fs::write(
        dir.join("scenario.json"),
        format!(
            r#"{{"gpus": [{{"uuid": "{UUID0}", "name": "Stallmon Simulated GPU",
                 "pci_bus_id": "00000000:3B:00.0", "memory_total_bytes": 85899345920}}, {{}}],
               "sample_period_ms": {PERIOD_MS}, "lag_ms": {LAG_MS}}}"#
        ),
    )
    .unwrap();
    let busy0 = dir.join("gpu0/busy");
    let contexts0 = dir.join("gpu0/contexts");
    let error1 = dir.join("gpu1/error");
    // A step that ended just before init: it belongs to the baseline period.
    let t_step = mono_ns();
    append(
        &busy0,
        &format!("{} {}\n", t_step - 15 * MS, t_step - 5 * MS),
    );

    let t_before = mono_ns();
    let nvml = init(&lib).expect("init with a scenario");
    let t_after = mono_ns();
    // The step above lies in the baseline period [init - 50 ms, init] if init came quickly.
    assert!(
        t_after - t_step < 35 * MS,
        "init took {} ms",
        (t_after - t_before) / MS
    );

    // --- Identity -----------------------------------------------------------------------------
    assert_eq!(nvml.sys_driver_version().unwrap(), "stallmon-standin");
    assert!(
        nvml.sys_nvml_version()
            .unwrap()
            .starts_with("stallmon-standin")
    );
    assert_eq!(nvml.device_count().unwrap(), 2);
    assert!(matches!(
        nvml.device_by_index(2).err(),
        Some(NvmlError::InvalidArg)
    ));
    let dev0 = nvml.device_by_index(0).unwrap();
    let dev1 = nvml.device_by_index(1).unwrap();
    assert_eq!(dev0.uuid().unwrap(), UUID0);
    assert_eq!(dev0.name().unwrap(), "Stallmon Simulated GPU");
    assert_eq!(dev0.pci_info().unwrap().bus_id, "00000000:3B:00.0");
    assert_eq!(dev0.pci_info().unwrap().bus, 0x3b);
    assert_eq!(dev0.minor_number().unwrap(), 0);
    assert_eq!(dev0.index().unwrap(), 0);
    assert_eq!(dev1.uuid().unwrap(), UUID1_DEFAULT);
    assert_eq!(dev1.name().unwrap(), "Stallmon Simulated GPU");
    assert_eq!(dev1.pci_info().unwrap().bus_id, "00000000:02:00.0");
    assert_eq!(dev1.minor_number().unwrap(), 1);
    assert_eq!(
        nvml.device_by_uuid(UUID1_DEFAULT).unwrap().index().unwrap(),
        1
    );
    assert!(matches!(
        nvml.device_by_uuid("GPU-nope").err(),
        Some(NvmlError::NotFound)
    ));
    assert_eq!(
        nvml.device_by_pci_bus_id("0000:3b:00.0")
            .unwrap()
            .index()
            .unwrap(),
        0
    );

    // --- Compute contexts and memory ---------------------------------------------------------
    let me = std::process::id();
    assert!(dev0.running_compute_processes().unwrap().is_empty());
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    append(&contexts0, &format!("{me}\nnot a pid\n{dead}\n"));
    let procs = dev0.running_compute_processes().unwrap();
    assert_eq!(procs.len(), 1, "{procs:?}");
    assert_eq!(procs[0].pid, me);
    assert_eq!(procs[0].used_gpu_memory, UsedGpuMemory::Used(GIB));
    assert_eq!(procs[0].gpu_instance_id, None);
    assert_eq!(dev0.running_compute_processes_count().unwrap(), 1);
    let mem = dev0.memory_info().unwrap();
    assert_eq!(
        (mem.total, mem.used, mem.free),
        (85_899_345_920, GIB, 85_899_345_920 - GIB)
    );
    assert!(dev1.running_compute_processes().unwrap().is_empty());
    assert_eq!(dev1.memory_info().unwrap().used, 0);
    // A removal whose line is not finished yet does not count...
    append(&contexts0, &format!("-{me}"));
    assert_eq!(dev0.running_compute_processes().unwrap().len(), 1);
    // ...until its newline arrives.
    append(&contexts0, "\n");
    assert!(dev0.running_compute_processes().unwrap().is_empty());
    assert_eq!(dev0.memory_info().unwrap().used, 0);
    assert!(matches!(
        dev0.process_utilization_stats(None).err(),
        Some(NvmlError::NotFound)
    ));

    // --- Utilization samples -----------------------------------------------------------------
    // Nothing is published before the baseline is `lag` old.
    if mono_ns() < t_before + LAG_MS * MS - 5 * MS {
        assert!(matches!(
            dev0.samples(Sampling::GpuUtilization, None).err(),
            Some(NvmlError::NotFound)
        ));
    }
    // The baseline sample (the period ending at init) appears once `lag` has passed.
    sleep_until_mono(t_after + LAG_MS * MS + 5 * MS);
    let first = dev0.samples(Sampling::GpuUtilization, None).unwrap();
    let ts0 = first[0].timestamp;
    let offset = offset_ns();
    let real_us = |mono: u64| ((i128::from(mono) + offset) / 1000) as u64;
    assert!(
        real_us(t_before) - 2000 <= ts0 && ts0 <= real_us(t_after) + 2000,
        "baseline timestamp {ts0} is not the realtime µs of init [{}, {}]",
        real_us(t_before),
        real_us(t_after)
    );
    assert_eq!(
        percent(&first[0]),
        20.0,
        "10 ms busy of the 50 ms before init"
    );
    // The init time on our monotonic clock, to µs precision.
    let origin = (i128::from(ts0) * 1000 - offset) as u64;

    // Steps in periods that are surely not published yet: k0 starts ≥ 2 periods from now.
    let k0 = (mono_ns() - origin) / P + 3;
    let a = origin + (k0 - 1) * P; // start of period k0
    let at = |ms: u64| a + ms * MS;
    let mut lines = String::new();
    // k0: 25 ms of 50.
    lines += &format!("{} {}\n", at(10), at(35));
    // k0+1: two overlapping steps, out of order: union 5..45 ms = 40 ms.
    lines += &format!("{} {}\n", at(50 + 30), at(50 + 45));
    lines += &format!("{} {}\n", at(50 + 5), at(50 + 35));
    // k0+2 and k0+3: one step across their boundary (10 ms + 20 ms).
    lines += &format!("{} {}\n", at(140), at(170));
    lines += "garbage line\n";
    // k0+6 .. k0+25: busy throughout (for the gauges below).
    lines += &format!("{} {}\n", at(300), at(1300));
    append(&busy0, &lines);
    // k0+4: a step written in two pieces: the partial line must wait for the rest.
    append(&busy0, &format!("{} ", at(205)));
    assert!(
        dev0.samples(Sampling::GpuUtilization, Some(u64::MAX))
            .is_err()
    );
    append(&busy0, &format!("{}\n", at(245)));

    sleep_until_mono(at(250) + LAG_MS * MS + 20 * MS);
    let samples = dev0.samples(Sampling::GpuUtilization, None).unwrap();
    assert_eq!(samples[0].timestamp, ts0, "the baseline is still buffered");
    for (k, s) in samples.iter().enumerate() {
        assert_eq!(
            s.timestamp,
            ts0 + k as u64 * PERIOD_MS * 1000,
            "one sample per period, on realtime µs"
        );
    }
    let last = samples.last().unwrap().timestamp;
    assert!(last * 1000 <= (i128::from(mono_ns()) + offset) as u64 - LAG_MS * MS);
    let k0 = k0 as usize;
    assert!(samples.len() > k0 + 4, "periods up to k0+4 are published");
    let value = |k: usize| percent(&samples[k]);
    assert_eq!(value(k0), 50.0);
    assert_eq!(value(k0 + 1), 80.0);
    // The boundary is the library's, our steps are placed from `origin` (± a few µs).
    assert!((value(k0 + 2) - 20.0).abs() < 0.05, "{}", value(k0 + 2));
    assert!((value(k0 + 3) - 40.0).abs() < 0.05, "{}", value(k0 + 3));
    assert!((value(k0 + 2) + value(k0 + 3) - 60.0).abs() < 1e-9);
    assert_eq!(value(k0 + 4), 80.0);
    // (Only k0+5 after them: k0+6 on are busy, and may be published if this thread was slow.)
    for k in (1..k0).chain(k0 + 5..samples.len().min(k0 + 6)) {
        assert_eq!(value(k), 0.0, "period {k} had no step");
    }
    assert_eq!(
        raw.line_counts(0),
        (2, 0),
        "one garbage busy line, one contexts line"
    );

    // lastSeenTimeStamp: only newer samples; none at all is NotFound.
    let newer = dev0
        .samples(Sampling::GpuUtilization, samples[k0 + 1].timestamp)
        .unwrap();
    assert_eq!(newer[0].timestamp, samples[k0 + 2].timestamp);
    assert_eq!(percent(&newer[2]), 80.0);
    assert!(matches!(
        dev0.samples(Sampling::GpuUtilization, realtime_us_now())
            .err(),
        Some(NvmlError::NotFound)
    ));
    assert!(matches!(
        dev0.samples(Sampling::ProcessorClock, None).err(),
        Some(NvmlError::NotSupported)
    ));
    // The raw two-call pattern: the count, then a smaller buffer gets the oldest samples.
    let (rc, count, _) = raw.samples(0, 0, None);
    assert_eq!(rc, 0);
    assert!(count as usize >= samples.len());
    let (rc, count, got) = raw.samples(0, 0, Some(2));
    assert_eq!((rc, count), (0, 2));
    assert_eq!(got[0], (ts0, 20.0));
    let (rc, _, _) = raw.samples(0, u64::MAX, None);
    assert_eq!(rc, sys::nvmlReturn_enum_NVML_ERROR_NOT_FOUND);

    // --- Gauges follow the newest published sample ---------------------------------------------
    // GPU 1 never ran anything.
    assert_eq!(dev1.temperature(TemperatureSensor::Gpu).unwrap(), 40);
    assert_eq!(dev1.power_usage().unwrap(), 70_000);
    assert!(
        dev1.current_throttle_reasons()
            .unwrap()
            .contains(ThrottleReasons::GPU_IDLE)
    );
    assert_eq!(dev1.pcie_throughput(PcieUtilCounter::Receive).unwrap(), 0);
    // GPU 0 is busy from k0+6 on: wait until such a period is the newest published.
    sleep_until_mono(at(400) + LAG_MS * MS + 20 * MS);
    assert_eq!(dev0.temperature(TemperatureSensor::Gpu).unwrap(), 80);
    assert_eq!(dev0.power_usage().unwrap(), 370_000);
    assert_eq!(dev0.clock_info(Clock::SM).unwrap(), 1980);
    assert!(dev0.current_throttle_reasons().unwrap().is_empty());
    assert_eq!(
        dev0.pcie_throughput(PcieUtilCounter::Receive).unwrap(),
        1_000_000
    );
    assert_eq!(
        dev0.pcie_throughput(PcieUtilCounter::Send).unwrap(),
        250_000
    );
    assert_eq!(dev0.utilization_rates().unwrap().gpu, 100);

    // --- Injected errors -------------------------------------------------------------------------
    write_file(&error1, "GPU_IS_LOST\n");
    assert!(matches!(
        nvml.device_by_index(1).err(),
        Some(NvmlError::GpuLost)
    ));
    assert!(matches!(dev1.uuid().err(), Some(NvmlError::GpuLost)));
    assert!(matches!(
        dev1.samples(Sampling::GpuUtilization, None).err(),
        Some(NvmlError::GpuLost)
    ));
    assert!(matches!(
        nvml.device_by_uuid(UUID1_DEFAULT).err(),
        Some(NvmlError::GpuLost)
    ));
    assert_eq!(nvml.device_count().unwrap(), 2);
    // The other GPU keeps working.
    assert_eq!(nvml.device_by_index(0).unwrap().uuid().unwrap(), UUID0);
    assert!(dev0.samples(Sampling::GpuUtilization, None).is_ok());
    assert_eq!(dev0.temperature(TemperatureSensor::Gpu).unwrap(), 80);

    write_file(&error1, "NOT_SUPPORTED nvmlDeviceGetPowerUsage\n");
    let dev1 = nvml.device_by_index(1).unwrap();
    assert!(matches!(
        dev1.power_usage().err(),
        Some(NvmlError::NotSupported)
    ));
    assert_eq!(dev1.temperature(TemperatureSensor::Gpu).unwrap(), 40);

    write_file(&error1, "TIMEOUT");
    let dev1 = nvml
        .device_by_index(1)
        .expect("only GPU_IS_LOST affects lookups");
    assert!(matches!(dev1.uuid().err(), Some(NvmlError::Timeout)));

    write_file(&error1, "UNKNOWN nvmlDeviceGetComputeRunningProcesses");
    assert!(matches!(
        dev1.running_compute_processes().err(),
        Some(NvmlError::Unknown)
    ));
    assert_eq!(dev1.uuid().unwrap(), UUID1_DEFAULT);

    std::fs::remove_file(&error1).unwrap();
    assert_eq!(dev1.power_usage().unwrap(), 70_000);
    assert!(dev1.running_compute_processes().unwrap().is_empty());

    // --- Reference-counted init, shutdown, and a fresh init ------------------------------------
    let second = init(&lib).expect("a second init while the first is active");
    drop(second);
    assert_eq!(dev0.uuid().unwrap(), UUID0, "the first one still works");
    let again = dev0.samples(Sampling::GpuUtilization, None).unwrap();
    assert_eq!(again[0].timestamp, ts0, "same timeline");
    nvml.shutdown().expect("shutdown");

    let t_reinit = mono_ns();
    let nvml = init(&lib).expect("init after shutdown");
    assert_eq!(nvml.device_count().unwrap(), 2);
    let dev0 = nvml.device_by_index(0).unwrap();
    assert_eq!(dev0.uuid().unwrap(), UUID0);
    sleep_until_mono(t_reinit + LAG_MS * MS + 20 * MS);
    let fresh = dev0.samples(Sampling::GpuUtilization, None).unwrap();
    assert!(
        fresh[0].timestamp >= real_us(t_reinit) - 2000,
        "a new timeline starts at the new init"
    );
    nvml.shutdown().expect("final shutdown");

    // Without our handle, each wrapper instance loads and unloads the library afresh.
    drop(raw);
    for _ in 0..2 {
        let nvml = init(&lib).expect("init after the library was unloaded");
        assert_eq!(nvml.device_count().unwrap(), 2);
        assert_eq!(nvml.device_by_index(0).unwrap().uuid().unwrap(), UUID0);
        nvml.shutdown().expect("shutdown");
    }
}
