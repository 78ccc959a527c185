//! The exported NVML functions (C ABI, NVML's names and signatures).
//!
//! Every function follows NVML's pointer contract: output pointers must be valid for writes of
//! the documented type (and, for buffers, of the documented length); null ones are rejected with
//! `NVML_ERROR_INVALID_ARGUMENT` where NVML does so. A panic never crosses the C boundary: it
//! becomes `NVML_ERROR_UNKNOWN`.

use std::ffi::{CStr, c_char, c_uint, c_ulonglong};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::ffi::*;
use crate::scenario::PciAddress;
use crate::state::{Gpu, State, StateClock, global, monotonic_ns};

/// What `nvmlSystemGetDriverVersion` reports: marks everything as simulated.
pub const DRIVER_VERSION: &str = "stallmon-standin";
/// What `nvmlSystemGetNVMLVersion` reports.
pub const NVML_VERSION: &str = concat!("stallmon-standin-", env!("CARGO_PKG_VERSION"));

/// Device memory each compute context is reported to use.
pub const CONTEXT_MEMORY_BYTES: u64 = 1 << 30;
/// SM and graphics clock, MHz.
pub const SM_CLOCK_MHZ: c_uint = 1980;
/// Memory clock, MHz.
pub const MEM_CLOCK_MHZ: c_uint = 2619;
/// Video clock, MHz.
pub const VIDEO_CLOCK_MHZ: c_uint = 1755;
/// PCIe receive / transmit throughput at 100 % utilization, KB/s.
pub const PCIE_RX_KBPS_AT_FULL: f64 = 1_000_000.0;
pub const PCIE_TX_KBPS_AT_FULL: f64 = 250_000.0;

/// Device handles are `HANDLE_BASE + index` cast to a pointer; they are never dereferenced.
const HANDLE_BASE: usize = 0x5afe_0000;

fn handle(index: usize) -> nvmlDevice_t {
    std::ptr::without_provenance_mut(HANDLE_BASE + index)
}

fn handle_index(device: nvmlDevice_t, count: usize) -> Option<usize> {
    device
        .addr()
        .checked_sub(HANDLE_BASE)
        .filter(|&i| i < count)
}

/// Runs `f`, turning a panic into `NVML_ERROR_UNKNOWN`.
fn guard(f: impl FnOnce() -> nvmlReturn_t) -> nvmlReturn_t {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(NVML_ERROR_UNKNOWN)
}

/// Runs `f` with the initialized state.
fn with_state(f: impl FnOnce(&mut State) -> nvmlReturn_t) -> nvmlReturn_t {
    guard(|| match global().state.as_mut() {
        Some(state) => f(state),
        None => NVML_ERROR_UNINITIALIZED,
    })
}

/// Runs `f` for the GPU of `device`, after applying its `error` file and reading its new lines.
fn device_call(
    function: &'static str,
    device: nvmlDevice_t,
    f: impl FnOnce(&mut Gpu, StateClock) -> nvmlReturn_t,
) -> nvmlReturn_t {
    with_state(|state| {
        let clock = state.clock();
        let Some(index) = handle_index(device, state.gpus.len()) else {
            return NVML_ERROR_INVALID_ARGUMENT;
        };
        let gpu = &mut state.gpus[index];
        if let Some(code) = gpu.injected_error(function, false) {
            return code;
        }
        gpu.injected_delay();
        gpu.refresh(monotonic_ns());
        f(gpu, clock)
    })
}

/// Hands out the handle of the GPU `find` picks, unless its `error` file forbids the lookup.
///
/// # Safety
/// `device` must be null or valid for writes.
unsafe fn lookup(
    function: &'static str,
    device: *mut nvmlDevice_t,
    find: impl FnOnce(&State) -> Result<usize, nvmlReturn_t>,
) -> nvmlReturn_t {
    with_state(|state| {
        if device.is_null() {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        let index = match find(state) {
            Ok(i) => i,
            Err(code) => return code,
        };
        if let Some(code) = state.gpus[index].injected_error(function, true) {
            return code;
        }
        // SAFETY: checked non-null; the caller provides a writable handle.
        unsafe { *device = handle(index) };
        NVML_SUCCESS
    })
}

/// Copies `s` and its NUL into `buf` of `length` bytes.
///
/// # Safety
/// `buf` must be null or valid for `length` bytes of writes.
unsafe fn write_str(buf: *mut c_char, length: c_uint, s: &str) -> nvmlReturn_t {
    if buf.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (length as usize) < s.len() + 1 {
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: `buf` holds at least `s.len() + 1` bytes (checked above).
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), s.len());
        *buf.add(s.len()) = 0;
    }
    NVML_SUCCESS
}

/// Writes `value` through `out` unless it is null.
///
/// # Safety
/// `out` must be null or valid for writes.
unsafe fn put<T>(out: *mut T, value: T) -> nvmlReturn_t {
    if out.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: non-null, and valid for writes per the caller.
    unsafe { out.write(value) };
    NVML_SUCCESS
}

/// A fixed-size C char array holding `s` (which must fit with its NUL).
fn c_array<const N: usize>(s: &str) -> [c_char; N] {
    let mut out = [0; N];
    for (o, b) in out.iter_mut().zip(s.bytes().take(N - 1)) {
        *o = b as c_char;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Initialization and errors

fn init(_flags: c_uint) -> nvmlReturn_t {
    guard(|| {
        let mut g = global();
        if g.refcount > 0 {
            g.refcount += 1;
            return NVML_SUCCESS;
        }
        match State::load() {
            Ok(state) => {
                g.state = Some(state);
                g.refcount = 1;
                g.init_failure = None;
                NVML_SUCCESS
            }
            Err((code, message)) => {
                eprintln!("{message}");
                let text = g.intern(&message);
                g.init_failure = Some((code, text));
                code
            }
        }
    })
}

/// Initializes the library: reads `$STALLMON_STANDIN_DIR/scenario.json` (first init only;
/// later ones just count, like NVML's reference counting).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    init(0)
}

/// The legacy unversioned init, same as [`nvmlInit_v2`].
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit() -> nvmlReturn_t {
    init(0)
}

/// [`nvmlInit_v2`] with flags, which are accepted and ignored.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(flags: c_uint) -> nvmlReturn_t {
    init(flags)
}

/// Undoes one init; the last one drops all state (a later init starts a new timeline).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    guard(|| {
        let mut g = global();
        if g.refcount == 0 {
            return NVML_ERROR_UNINITIALIZED;
        }
        g.refcount -= 1;
        if g.refcount == 0 {
            g.state = None;
        }
        NVML_SUCCESS
    })
}

/// Static text for a return code; after a failed init, its code gives the detailed reason.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let text: &'static CStr = catch_unwind(|| {
        let g = global();
        if let Some((code, text)) = g.init_failure
            && code == result
        {
            return text;
        }
        if result == NVML_SUCCESS {
            return c"Success";
        }
        ERRORS
            .iter()
            .find(|(code, _, _)| *code == result)
            .map_or(c"Unknown Error", |&(_, _, text)| text)
    })
    .unwrap_or(c"Unknown Error");
    text.as_ptr()
}

// ---------------------------------------------------------------------------------------------
// System

/// Writes [`DRIVER_VERSION`] (`"stallmon-standin"`).
///
/// # Safety
/// `version` must be valid for `length` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    // SAFETY: per this function's contract.
    with_state(|_| unsafe { write_str(version, length, DRIVER_VERSION) })
}

/// Writes [`NVML_VERSION`].
///
/// # Safety
/// `version` must be valid for `length` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    // SAFETY: per this function's contract.
    with_state(|_| unsafe { write_str(version, length, NVML_VERSION) })
}

/// Debugging aid, not part of NVML: malformed lines read so far from GPU `device`'s `busy` and
/// `contexts` files (`garbage`) and `busy` intervals ignored because they arrived after their
/// period was published (`late`). Either pointer may be null.
///
/// # Safety
/// Non-null pointers must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn stallmonStandinGetLineCounts(
    device: nvmlDevice_t,
    garbage: *mut c_ulonglong,
    late: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_state(|state| {
        let Some(index) = handle_index(device, state.gpus.len()) else {
            return NVML_ERROR_INVALID_ARGUMENT;
        };
        let gpu = &mut state.gpus[index];
        gpu.refresh(monotonic_ns());
        // SAFETY: per this function's contract.
        unsafe {
            if !garbage.is_null() {
                garbage.write(gpu.garbage_lines());
            }
            if !late.is_null() {
                late.write(gpu.late_lines());
            }
        }
        NVML_SUCCESS
    })
}

// ---------------------------------------------------------------------------------------------
// Device enumeration and identity

/// Number of GPUs in the scenario.
///
/// # Safety
/// `deviceCount` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(deviceCount: *mut c_uint) -> nvmlReturn_t {
    // SAFETY: per this function's contract.
    with_state(|state| unsafe { put(deviceCount, state.gpus.len() as c_uint) })
}

/// Handle of GPU `index` (its position in `scenario.json`).
///
/// # Safety
/// `device` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    // SAFETY: per this function's contract.
    unsafe {
        lookup("nvmlDeviceGetHandleByIndex_v2", device, |state| {
            let i = index as usize;
            if i < state.gpus.len() {
                Ok(i)
            } else {
                Err(NVML_ERROR_INVALID_ARGUMENT)
            }
        })
    }
}

/// Handle of the GPU with this UUID.
///
/// # Safety
/// `uuid` must be null or a NUL-terminated string; `device` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    if uuid.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: a NUL-terminated string per this function's contract.
    let uuid = unsafe { CStr::from_ptr(uuid) }.to_bytes().to_vec();
    // SAFETY: per this function's contract.
    unsafe {
        lookup("nvmlDeviceGetHandleByUUID", device, |state| {
            state
                .gpus
                .iter()
                .position(|g| g.spec.uuid.as_bytes() == uuid)
                .ok_or(NVML_ERROR_NOT_FOUND)
        })
    }
}

/// Handle of the GPU at this PCI address (`00000000:3B:00.0` or `0000:3B:00.0`, any case).
///
/// # Safety
/// `pciBusId` must be null or a NUL-terminated string; `device` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByPciBusId_v2(
    pciBusId: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    if pciBusId.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: a NUL-terminated string per this function's contract.
    let text = unsafe { CStr::from_ptr(pciBusId) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: per this function's contract.
    unsafe {
        lookup("nvmlDeviceGetHandleByPciBusId_v2", device, |state| {
            let pci = PciAddress::parse(&text).ok_or(NVML_ERROR_INVALID_ARGUMENT)?;
            state
                .gpus
                .iter()
                .position(|g| g.spec.pci == pci)
                .ok_or(NVML_ERROR_NOT_FOUND)
        })
    }
}

/// The GPU's UUID from the scenario.
///
/// # Safety
/// `uuid` must be valid for `length` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    // SAFETY: per this function's contract.
    device_call("nvmlDeviceGetUUID", device, |gpu, _| unsafe {
        write_str(uuid, length, &gpu.spec.uuid)
    })
}

/// The GPU's name from the scenario.
///
/// # Safety
/// `name` must be valid for `length` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    // SAFETY: per this function's contract.
    device_call("nvmlDeviceGetName", device, |gpu, _| unsafe {
        write_str(name, length, &gpu.spec.name)
    })
}

/// The GPU's index.
///
/// # Safety
/// `index` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: nvmlDevice_t,
    index: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: per this function's contract.
    device_call("nvmlDeviceGetIndex", device, |gpu, _| unsafe {
        put(index, gpu.index)
    })
}

/// The GPU's minor number: its index (GPU i is `/dev/nvidia<i>`).
///
/// # Safety
/// `minorNumber` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMinorNumber(
    device: nvmlDevice_t,
    minorNumber: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: per this function's contract.
    device_call("nvmlDeviceGetMinorNumber", device, |gpu, _| unsafe {
        put(minorNumber, gpu.index)
    })
}

/// PCI identity: the scenario's address; device id 0x5AFE, vendor NVIDIA (0x10DE).
///
/// # Safety
/// `pci` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    device_call("nvmlDeviceGetPciInfo_v3", device, |gpu, _| {
        let a = gpu.spec.pci;
        let info = nvmlPciInfo_t {
            busIdLegacy: c_array(&a.bus_id_legacy()),
            domain: a.domain,
            bus: a.bus.into(),
            device: a.device.into(),
            pciDeviceId: 0x5AFE_10DE,
            pciSubSystemId: 0x5AFE_10DE,
            busId: c_array(&a.bus_id()),
        };
        // SAFETY: per this function's contract.
        unsafe { put(pci, info) }
    })
}

// ---------------------------------------------------------------------------------------------
// Utilization

/// Utilization samples (`NVML_GPU_UTILIZATION_SAMPLES` only; other types: NOT_SUPPORTED) with
/// timestamp > `lastSeenTimeStamp`, oldest first, as doubles (percent). `samples` null: only
/// the count. No such sample: NOT_FOUND. A buffer smaller than the count gets the oldest ones.
///
/// # Safety
/// `sampleValType` and `sampleCount` must be valid for writes; `samples` must be null or valid
/// for `*sampleCount` writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSamples(
    device: nvmlDevice_t,
    type_: nvmlSamplingType_t,
    lastSeenTimeStamp: c_ulonglong,
    sampleValType: *mut nvmlValueType_t,
    sampleCount: *mut c_uint,
    samples: *mut nvmlSample_t,
) -> nvmlReturn_t {
    device_call("nvmlDeviceGetSamples", device, |gpu, clock| {
        if type_ != NVML_GPU_UTILIZATION_SAMPLES {
            return NVML_ERROR_NOT_SUPPORTED;
        }
        if sampleValType.is_null() || sampleCount.is_null() {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        let newer = gpu.samples_after(clock, lastSeenTimeStamp);
        // SAFETY: per this function's contract (checked non-null above).
        unsafe {
            *sampleValType = NVML_VALUE_TYPE_DOUBLE;
            if newer.is_empty() {
                *sampleCount = 0;
                return NVML_ERROR_NOT_FOUND;
            }
            if samples.is_null() {
                *sampleCount = newer.len() as c_uint;
                return NVML_SUCCESS;
            }
            let capacity = *sampleCount as usize;
            if capacity == 0 {
                *sampleCount = newer.len() as c_uint;
                return NVML_ERROR_INSUFFICIENT_SIZE;
            }
            let n = capacity.min(newer.len());
            for (i, &(ts, percent)) in newer.iter().take(n).enumerate() {
                samples.add(i).write(nvmlSample_t {
                    timeStamp: ts,
                    sampleValue: nvmlValue_t { dVal: percent },
                });
            }
            *sampleCount = n as c_uint;
        }
        NVML_SUCCESS
    })
}

/// Utilization of the newest published sample (memory: half of it).
///
/// # Safety
/// `utilization` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    utilization: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    device_call("nvmlDeviceGetUtilizationRates", device, |gpu, _| {
        let u = gpu.recent_utilization();
        let rates = nvmlUtilization_t {
            gpu: (u * 100.0).round() as c_uint,
            memory: (u * 50.0).round() as c_uint,
        };
        // SAFETY: per this function's contract.
        unsafe { put(utilization, rates) }
    })
}

/// Per-process utilization is not simulated: always NOT_FOUND (no samples).
///
/// # Safety
/// `processSamplesCount` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    _utilization: *mut nvmlProcessUtilizationSample_t,
    processSamplesCount: *mut c_uint,
    _lastSeenTimeStamp: c_ulonglong,
) -> nvmlReturn_t {
    device_call("nvmlDeviceGetProcessUtilization", device, |_, _| {
        if processSamplesCount.is_null() {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        // SAFETY: per this function's contract.
        unsafe { *processSamplesCount = 0 };
        NVML_ERROR_NOT_FOUND
    })
}

// ---------------------------------------------------------------------------------------------
// Processes and memory

/// Fills an NVML process array with the live contexts (see NVML's two-call pattern).
///
/// # Safety
/// `count` must be valid for writes; `infos` null or valid for `*count` writes.
unsafe fn fill_processes<T>(
    function: &'static str,
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut T,
    make: fn(u32) -> T,
) -> nvmlReturn_t {
    device_call(function, device, |gpu, _| {
        if count.is_null() {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        let pids = gpu.live_contexts();
        // SAFETY: per this function's contract (checked non-null above).
        unsafe {
            if pids.len() > *count as usize || (infos.is_null() && !pids.is_empty()) {
                *count = pids.len() as c_uint;
                return NVML_ERROR_INSUFFICIENT_SIZE;
            }
            for (i, &pid) in pids.iter().enumerate() {
                infos.add(i).write(make(pid));
            }
            *count = pids.len() as c_uint;
        }
        NVML_SUCCESS
    })
}

fn process_info(pid: u32) -> nvmlProcessInfo_t {
    nvmlProcessInfo_t {
        pid,
        usedGpuMemory: CONTEXT_MEMORY_BYTES,
        gpuInstanceId: NVML_VALUE_NOT_AVAILABLE_U32,
        computeInstanceId: NVML_VALUE_NOT_AVAILABLE_U32,
    }
}

/// Processes holding a context (from `contexts`, minus exited ones), 1 GiB each.
///
/// # Safety
/// `infoCount` must be valid for writes; `infos` null or valid for `*infoCount` writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    infoCount: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    // SAFETY: per this function's contract.
    unsafe {
        fill_processes(
            "nvmlDeviceGetComputeRunningProcesses_v3",
            device,
            infoCount,
            infos,
            process_info,
        )
    }
}

/// Same as [`nvmlDeviceGetComputeRunningProcesses_v3`] (the v2 struct has the same layout).
///
/// # Safety
/// `infoCount` must be valid for writes; `infos` null or valid for `*infoCount` writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v2(
    device: nvmlDevice_t,
    infoCount: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    // SAFETY: per this function's contract.
    unsafe {
        fill_processes(
            "nvmlDeviceGetComputeRunningProcesses_v2",
            device,
            infoCount,
            infos,
            process_info,
        )
    }
}

/// The legacy unversioned call, with the v1 struct (pid and memory only).
///
/// # Safety
/// `infoCount` must be valid for writes; `infos` null or valid for `*infoCount` writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses(
    device: nvmlDevice_t,
    infoCount: *mut c_uint,
    infos: *mut nvmlProcessInfo_v1_t,
) -> nvmlReturn_t {
    // SAFETY: per this function's contract.
    unsafe {
        fill_processes(
            "nvmlDeviceGetComputeRunningProcesses",
            device,
            infoCount,
            infos,
            |pid| nvmlProcessInfo_v1_t {
                pid,
                usedGpuMemory: CONTEXT_MEMORY_BYTES,
            },
        )
    }
}

/// (used, free) memory: 1 GiB per live context, capped at the total.
fn memory_use(gpu: &mut Gpu) -> (u64, u64) {
    let total = gpu.spec.memory_total_bytes;
    let used = (gpu.live_contexts().len() as u64)
        .saturating_mul(CONTEXT_MEMORY_BYTES)
        .min(total);
    (used, total - used)
}

/// Memory: total from the scenario, 1 GiB used per live context.
///
/// # Safety
/// `memory` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_t,
) -> nvmlReturn_t {
    device_call("nvmlDeviceGetMemoryInfo", device, |gpu, _| {
        let (used, free) = memory_use(gpu);
        let total = gpu.spec.memory_total_bytes;
        // SAFETY: per this function's contract.
        unsafe { put(memory, nvmlMemory_t { total, free, used }) }
    })
}

/// [`nvmlDeviceGetMemoryInfo`] with the versioned struct (what `nvml-wrapper` calls); nothing
/// is reserved. The caller's `version` field is kept.
///
/// # Safety
/// `memory` must be valid for reads and writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    device_call("nvmlDeviceGetMemoryInfo_v2", device, |gpu, _| {
        if memory.is_null() {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        let (used, free) = memory_use(gpu);
        // SAFETY: per this function's contract (checked non-null above).
        unsafe {
            let m = &mut *memory;
            m.total = gpu.spec.memory_total_bytes;
            m.reserved = 0;
            m.free = free;
            m.used = used;
        }
        NVML_SUCCESS
    })
}

// ---------------------------------------------------------------------------------------------
// Gauges driven by the newest published utilization `u` (0..=1)

/// GPU temperature: 40 + 40·u °C. Other sensors: INVALID_ARGUMENT.
///
/// # Safety
/// `temp` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensorType: nvmlTemperatureSensors_t,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    device_call("nvmlDeviceGetTemperature", device, |gpu, _| {
        if sensorType != NVML_TEMPERATURE_GPU {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        let c = 40.0 + 40.0 * gpu.recent_utilization();
        // SAFETY: per this function's contract.
        unsafe { put(temp, c.round() as c_uint) }
    })
}

/// Power draw: 70 + 300·u W, in mW.
///
/// # Safety
/// `power` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: nvmlDevice_t,
    power: *mut c_uint,
) -> nvmlReturn_t {
    device_call("nvmlDeviceGetPowerUsage", device, |gpu, _| {
        let mw = (70.0 + 300.0 * gpu.recent_utilization()) * 1000.0;
        // SAFETY: per this function's contract.
        unsafe { put(power, mw.round() as c_uint) }
    })
}

/// Clocks: graphics and SM 1980 MHz, memory 2619 MHz, video 1755 MHz.
///
/// # Safety
/// `clock` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: nvmlDevice_t,
    type_: nvmlClockType_t,
    clock: *mut c_uint,
) -> nvmlReturn_t {
    device_call("nvmlDeviceGetClockInfo", device, |_, _| {
        let mhz = match type_ {
            NVML_CLOCK_GRAPHICS | NVML_CLOCK_SM => SM_CLOCK_MHZ,
            NVML_CLOCK_MEM => MEM_CLOCK_MHZ,
            NVML_CLOCK_VIDEO => VIDEO_CLOCK_MHZ,
            _ => return NVML_ERROR_INVALID_ARGUMENT,
        };
        // SAFETY: per this function's contract.
        unsafe { put(clock, mhz) }
    })
}

/// # Safety
/// `out` must be null or valid for writes.
unsafe fn clock_reasons(
    function: &'static str,
    device: nvmlDevice_t,
    out: *mut c_ulonglong,
) -> nvmlReturn_t {
    device_call(function, device, |gpu, _| {
        let reasons = if gpu.recent_utilization() == 0.0 {
            nvmlClocksThrottleReasonGpuIdle
        } else {
            nvmlClocksThrottleReasonNone
        };
        // SAFETY: per this function's contract.
        unsafe { put(out, reasons) }
    })
}

/// Clock throttle reasons: GPU_IDLE when the newest sample is 0 %, else none.
///
/// # Safety
/// `clocksThrottleReasons` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: nvmlDevice_t,
    clocksThrottleReasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    // SAFETY: per this function's contract.
    unsafe {
        clock_reasons(
            "nvmlDeviceGetCurrentClocksThrottleReasons",
            device,
            clocksThrottleReasons,
        )
    }
}

/// The newer name of [`nvmlDeviceGetCurrentClocksThrottleReasons`].
///
/// # Safety
/// `clocksEventReasons` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksEventReasons(
    device: nvmlDevice_t,
    clocksEventReasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    // SAFETY: per this function's contract.
    unsafe {
        clock_reasons(
            "nvmlDeviceGetCurrentClocksEventReasons",
            device,
            clocksEventReasons,
        )
    }
}

/// PCIe throughput, KB/s: receive 1 000 000·u, transmit 250 000·u.
///
/// # Safety
/// `value` must be valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPcieThroughput(
    device: nvmlDevice_t,
    counter: nvmlPcieUtilCounter_t,
    value: *mut c_uint,
) -> nvmlReturn_t {
    device_call("nvmlDeviceGetPcieThroughput", device, |gpu, _| {
        let full = match counter {
            NVML_PCIE_UTIL_RX_BYTES => PCIE_RX_KBPS_AT_FULL,
            NVML_PCIE_UTIL_TX_BYTES => PCIE_TX_KBPS_AT_FULL,
            _ => return NVML_ERROR_INVALID_ARGUMENT,
        };
        let kbps = full * gpu.recent_utilization();
        // SAFETY: per this function's contract.
        unsafe { put(value, kbps.round() as c_uint) }
    })
}
