//! The parts of `nvml.h` the stand-in implements: return codes, enums and struct layouts, copied
//! from the real header (as bound by `nvml-wrapper-sys` 0.10). The unit tests check the layouts
//! against `nvml-wrapper-sys`.

#![allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code
)]

use std::ffi::{c_char, c_uint, c_ulonglong};

pub type nvmlReturn_t = c_uint;

pub const NVML_SUCCESS: nvmlReturn_t = 0;
pub const NVML_ERROR_UNINITIALIZED: nvmlReturn_t = 1;
pub const NVML_ERROR_INVALID_ARGUMENT: nvmlReturn_t = 2;
pub const NVML_ERROR_NOT_SUPPORTED: nvmlReturn_t = 3;
pub const NVML_ERROR_NO_PERMISSION: nvmlReturn_t = 4;
pub const NVML_ERROR_ALREADY_INITIALIZED: nvmlReturn_t = 5;
pub const NVML_ERROR_NOT_FOUND: nvmlReturn_t = 6;
pub const NVML_ERROR_INSUFFICIENT_SIZE: nvmlReturn_t = 7;
pub const NVML_ERROR_INSUFFICIENT_POWER: nvmlReturn_t = 8;
pub const NVML_ERROR_DRIVER_NOT_LOADED: nvmlReturn_t = 9;
pub const NVML_ERROR_TIMEOUT: nvmlReturn_t = 10;
pub const NVML_ERROR_IRQ_ISSUE: nvmlReturn_t = 11;
pub const NVML_ERROR_LIBRARY_NOT_FOUND: nvmlReturn_t = 12;
pub const NVML_ERROR_FUNCTION_NOT_FOUND: nvmlReturn_t = 13;
pub const NVML_ERROR_CORRUPTED_INFOROM: nvmlReturn_t = 14;
pub const NVML_ERROR_GPU_IS_LOST: nvmlReturn_t = 15;
pub const NVML_ERROR_RESET_REQUIRED: nvmlReturn_t = 16;
pub const NVML_ERROR_OPERATING_SYSTEM: nvmlReturn_t = 17;
pub const NVML_ERROR_LIB_RM_VERSION_MISMATCH: nvmlReturn_t = 18;
pub const NVML_ERROR_IN_USE: nvmlReturn_t = 19;
pub const NVML_ERROR_MEMORY: nvmlReturn_t = 20;
pub const NVML_ERROR_NO_DATA: nvmlReturn_t = 21;
pub const NVML_ERROR_VGPU_ECC_NOT_SUPPORTED: nvmlReturn_t = 22;
pub const NVML_ERROR_INSUFFICIENT_RESOURCES: nvmlReturn_t = 23;
pub const NVML_ERROR_FREQ_NOT_SUPPORTED: nvmlReturn_t = 24;
pub const NVML_ERROR_ARGUMENT_VERSION_MISMATCH: nvmlReturn_t = 25;
pub const NVML_ERROR_DEPRECATED: nvmlReturn_t = 26;
pub const NVML_ERROR_NOT_READY: nvmlReturn_t = 27;
pub const NVML_ERROR_GPU_NOT_FOUND: nvmlReturn_t = 28;
pub const NVML_ERROR_INVALID_STATE: nvmlReturn_t = 29;
pub const NVML_ERROR_RESET_TYPE_NOT_SUPPORTED: nvmlReturn_t = 30;
pub const NVML_ERROR_UNKNOWN: nvmlReturn_t = 999;

/// Every error code: its name without the `NVML_ERROR_` prefix (as written in an `error` file),
/// and the text `nvmlErrorString` gives for it.
pub const ERRORS: &[(nvmlReturn_t, &str, &std::ffi::CStr)] = &[
    (NVML_ERROR_UNINITIALIZED, "UNINITIALIZED", c"Uninitialized"),
    (
        NVML_ERROR_INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        c"Invalid Argument",
    ),
    (NVML_ERROR_NOT_SUPPORTED, "NOT_SUPPORTED", c"Not Supported"),
    (
        NVML_ERROR_NO_PERMISSION,
        "NO_PERMISSION",
        c"Insufficient Permissions",
    ),
    (
        NVML_ERROR_ALREADY_INITIALIZED,
        "ALREADY_INITIALIZED",
        c"Already Initialized",
    ),
    (NVML_ERROR_NOT_FOUND, "NOT_FOUND", c"Not Found"),
    (
        NVML_ERROR_INSUFFICIENT_SIZE,
        "INSUFFICIENT_SIZE",
        c"Insufficient Size",
    ),
    (
        NVML_ERROR_INSUFFICIENT_POWER,
        "INSUFFICIENT_POWER",
        c"Insufficient External Power",
    ),
    (
        NVML_ERROR_DRIVER_NOT_LOADED,
        "DRIVER_NOT_LOADED",
        c"Driver Not Loaded",
    ),
    (NVML_ERROR_TIMEOUT, "TIMEOUT", c"Timeout"),
    (
        NVML_ERROR_IRQ_ISSUE,
        "IRQ_ISSUE",
        c"Interrupt Request Issue",
    ),
    (
        NVML_ERROR_LIBRARY_NOT_FOUND,
        "LIBRARY_NOT_FOUND",
        c"NVML Shared Library Not Found",
    ),
    (
        NVML_ERROR_FUNCTION_NOT_FOUND,
        "FUNCTION_NOT_FOUND",
        c"Function Not Found",
    ),
    (
        NVML_ERROR_CORRUPTED_INFOROM,
        "CORRUPTED_INFOROM",
        c"Corrupted infoROM",
    ),
    (NVML_ERROR_GPU_IS_LOST, "GPU_IS_LOST", c"GPU is lost"),
    (
        NVML_ERROR_RESET_REQUIRED,
        "RESET_REQUIRED",
        c"GPU requires restart",
    ),
    (
        NVML_ERROR_OPERATING_SYSTEM,
        "OPERATING_SYSTEM",
        c"The operating system has blocked the request.",
    ),
    (
        NVML_ERROR_LIB_RM_VERSION_MISMATCH,
        "LIB_RM_VERSION_MISMATCH",
        c"RM has detected an NVML/RM version mismatch.",
    ),
    (NVML_ERROR_IN_USE, "IN_USE", c"In use by another client"),
    (NVML_ERROR_MEMORY, "MEMORY", c"Insufficient Memory"),
    (NVML_ERROR_NO_DATA, "NO_DATA", c"No data"),
    (
        NVML_ERROR_VGPU_ECC_NOT_SUPPORTED,
        "VGPU_ECC_NOT_SUPPORTED",
        c"ECC is not supported on vGPU",
    ),
    (
        NVML_ERROR_INSUFFICIENT_RESOURCES,
        "INSUFFICIENT_RESOURCES",
        c"Insufficient resources",
    ),
    (
        NVML_ERROR_FREQ_NOT_SUPPORTED,
        "FREQ_NOT_SUPPORTED",
        c"Frequency not supported",
    ),
    (
        NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
        "ARGUMENT_VERSION_MISMATCH",
        c"Argument version mismatch",
    ),
    (NVML_ERROR_DEPRECATED, "DEPRECATED", c"Deprecated"),
    (NVML_ERROR_NOT_READY, "NOT_READY", c"Not ready"),
    (NVML_ERROR_GPU_NOT_FOUND, "GPU_NOT_FOUND", c"GPU not found"),
    (NVML_ERROR_INVALID_STATE, "INVALID_STATE", c"Invalid state"),
    (
        NVML_ERROR_RESET_TYPE_NOT_SUPPORTED,
        "RESET_TYPE_NOT_SUPPORTED",
        c"Reset type not supported",
    ),
    (NVML_ERROR_UNKNOWN, "UNKNOWN", c"Unknown Error"),
];

/// Opaque device structure; handles handed out are never dereferenced (see `lib.rs`).
#[repr(C)]
pub struct nvmlDevice_st {
    _private: [u8; 0],
}
pub type nvmlDevice_t = *mut nvmlDevice_st;

pub const NVML_INIT_FLAG_NO_GPUS: c_uint = 1;
pub const NVML_INIT_FLAG_NO_ATTACH: c_uint = 2;

pub const NVML_DEVICE_UUID_BUFFER_SIZE: usize = 80;
pub const NVML_DEVICE_NAME_BUFFER_SIZE: usize = 64;
pub const NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE: usize = 32;
pub const NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE: usize = 16;

pub type nvmlSamplingType_t = c_uint;
pub const NVML_GPU_UTILIZATION_SAMPLES: nvmlSamplingType_t = 1;

pub type nvmlValueType_t = c_uint;
pub const NVML_VALUE_TYPE_DOUBLE: nvmlValueType_t = 0;

pub type nvmlTemperatureSensors_t = c_uint;
pub const NVML_TEMPERATURE_GPU: nvmlTemperatureSensors_t = 0;

pub type nvmlClockType_t = c_uint;
pub const NVML_CLOCK_GRAPHICS: nvmlClockType_t = 0;
pub const NVML_CLOCK_SM: nvmlClockType_t = 1;
pub const NVML_CLOCK_MEM: nvmlClockType_t = 2;
pub const NVML_CLOCK_VIDEO: nvmlClockType_t = 3;

pub type nvmlPcieUtilCounter_t = c_uint;
pub const NVML_PCIE_UTIL_TX_BYTES: nvmlPcieUtilCounter_t = 0;
pub const NVML_PCIE_UTIL_RX_BYTES: nvmlPcieUtilCounter_t = 1;

pub const nvmlClocksThrottleReasonGpuIdle: c_ulonglong = 1;
pub const nvmlClocksThrottleReasonNone: c_ulonglong = 0;

/// `gpuInstanceId` / `computeInstanceId` of a process outside any MIG instance.
pub const NVML_VALUE_NOT_AVAILABLE_U32: c_uint = 0xFFFF_FFFF;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nvmlMemory_t {
    pub total: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nvmlMemory_v2_t {
    pub version: c_uint,
    pub total: c_ulonglong,
    pub reserved: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nvmlPciInfo_t {
    pub busIdLegacy: [c_char; NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE],
    pub domain: c_uint,
    pub bus: c_uint,
    pub device: c_uint,
    pub pciDeviceId: c_uint,
    pub pciSubSystemId: c_uint,
    pub busId: [c_char; NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE],
}

/// `nvmlProcessInfo_v1_t`, used by the legacy unversioned `nvmlDeviceGetComputeRunningProcesses`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nvmlProcessInfo_v1_t {
    pub pid: c_uint,
    pub usedGpuMemory: c_ulonglong,
}

/// `nvmlProcessInfo_t`, which is `nvmlProcessInfo_v2_t`: used by both `_v2` and `_v3` calls.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nvmlProcessInfo_t {
    pub pid: c_uint,
    pub usedGpuMemory: c_ulonglong,
    pub gpuInstanceId: c_uint,
    pub computeInstanceId: c_uint,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub union nvmlValue_t {
    pub dVal: f64,
    pub siVal: std::ffi::c_int,
    pub uiVal: c_uint,
    pub ulVal: std::ffi::c_ulong,
    pub ullVal: c_ulonglong,
    pub sllVal: std::ffi::c_longlong,
    pub usVal: std::ffi::c_ushort,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct nvmlSample_t {
    pub timeStamp: c_ulonglong,
    pub sampleValue: nvmlValue_t,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nvmlProcessUtilizationSample_t {
    pub pid: c_uint,
    pub timeStamp: c_ulonglong,
    pub smUtil: c_uint,
    pub memUtil: c_uint,
    pub encUtil: c_uint,
    pub decUtil: c_uint,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nvmlUtilization_t {
    pub gpu: c_uint,
    pub memory: c_uint,
}

/// The NVML error code named `name` (`GPU_IS_LOST` or `NVML_ERROR_GPU_IS_LOST`).
pub fn error_by_name(name: &str) -> Option<nvmlReturn_t> {
    let name = name.strip_prefix("NVML_ERROR_").unwrap_or(name);
    ERRORS
        .iter()
        .find(|(_, n, _)| n.eq_ignore_ascii_case(name))
        .map(|&(code, _, _)| code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvml_wrapper_sys::bindings as sys;
    use std::mem::{align_of, offset_of, size_of};

    macro_rules! same_layout {
        ($ours:ty, $theirs:ty, [$($field:ident),*]) => {
            assert_eq!(size_of::<$ours>(), size_of::<$theirs>(), stringify!($ours));
            assert_eq!(align_of::<$ours>(), align_of::<$theirs>(), stringify!($ours));
            $(assert_eq!(
                offset_of!($ours, $field),
                offset_of!($theirs, $field),
                concat!(stringify!($ours), ".", stringify!($field))
            );)*
        };
    }

    #[test]
    fn layouts_match_nvml_header() {
        same_layout!(nvmlMemory_t, sys::nvmlMemory_t, [total, free, used]);
        same_layout!(
            nvmlMemory_v2_t,
            sys::nvmlMemory_v2_t,
            [version, total, reserved, free, used]
        );
        same_layout!(
            nvmlPciInfo_t,
            sys::nvmlPciInfo_t,
            [
                busIdLegacy,
                domain,
                bus,
                device,
                pciDeviceId,
                pciSubSystemId,
                busId
            ]
        );
        same_layout!(
            nvmlProcessInfo_v1_t,
            sys::nvmlProcessInfo_v1_t,
            [pid, usedGpuMemory]
        );
        same_layout!(
            nvmlProcessInfo_t,
            sys::nvmlProcessInfo_t,
            [pid, usedGpuMemory, gpuInstanceId, computeInstanceId]
        );
        same_layout!(nvmlValue_t, sys::nvmlValue_t, []);
        same_layout!(nvmlSample_t, sys::nvmlSample_t, [timeStamp, sampleValue]);
        same_layout!(
            nvmlProcessUtilizationSample_t,
            sys::nvmlProcessUtilizationSample_t,
            [pid, timeStamp, smUtil, memUtil, encUtil, decUtil]
        );
        same_layout!(nvmlUtilization_t, sys::nvmlUtilization_t, [gpu, memory]);
    }

    #[test]
    fn constants_match_nvml_header() {
        assert_eq!(
            NVML_GPU_UTILIZATION_SAMPLES,
            sys::nvmlSamplingType_enum_NVML_GPU_UTILIZATION_SAMPLES
        );
        assert_eq!(
            NVML_VALUE_TYPE_DOUBLE,
            sys::nvmlValueType_enum_NVML_VALUE_TYPE_DOUBLE
        );
        assert_eq!(
            NVML_TEMPERATURE_GPU,
            sys::nvmlTemperatureSensors_enum_NVML_TEMPERATURE_GPU
        );
        assert_eq!(NVML_CLOCK_SM, sys::nvmlClockType_enum_NVML_CLOCK_SM);
        assert_eq!(NVML_CLOCK_MEM, sys::nvmlClockType_enum_NVML_CLOCK_MEM);
        assert_eq!(
            NVML_PCIE_UTIL_RX_BYTES,
            sys::nvmlPcieUtilCounter_enum_NVML_PCIE_UTIL_RX_BYTES
        );
        assert_eq!(
            NVML_PCIE_UTIL_TX_BYTES,
            sys::nvmlPcieUtilCounter_enum_NVML_PCIE_UTIL_TX_BYTES
        );
        assert_eq!(
            nvmlClocksThrottleReasonGpuIdle,
            u64::from(sys::nvmlClocksThrottleReasonGpuIdle)
        );
        assert_eq!(
            NVML_DEVICE_UUID_BUFFER_SIZE as u32,
            sys::NVML_DEVICE_UUID_BUFFER_SIZE
        );
        assert_eq!(
            NVML_DEVICE_NAME_BUFFER_SIZE as u32,
            sys::NVML_DEVICE_NAME_BUFFER_SIZE
        );
        assert_eq!(
            NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE as u32,
            sys::NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE
        );
        assert_eq!(NVML_INIT_FLAG_NO_GPUS, sys::NVML_INIT_FLAG_NO_GPUS);
        assert_eq!(
            NVML_ERROR_GPU_IS_LOST,
            sys::nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST
        );
        assert_eq!(
            NVML_ERROR_NOT_FOUND,
            sys::nvmlReturn_enum_NVML_ERROR_NOT_FOUND
        );
        assert_eq!(
            NVML_ERROR_INSUFFICIENT_SIZE,
            sys::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE
        );
        assert_eq!(NVML_ERROR_TIMEOUT, sys::nvmlReturn_enum_NVML_ERROR_TIMEOUT);
        assert_eq!(
            NVML_ERROR_RESET_TYPE_NOT_SUPPORTED,
            sys::nvmlReturn_enum_NVML_ERROR_RESET_TYPE_NOT_SUPPORTED
        );
        assert_eq!(NVML_ERROR_UNKNOWN, sys::nvmlReturn_enum_NVML_ERROR_UNKNOWN);
    }

    #[test]
    fn error_names() {
        assert_eq!(error_by_name("GPU_IS_LOST"), Some(NVML_ERROR_GPU_IS_LOST));
        assert_eq!(
            error_by_name("NVML_ERROR_TIMEOUT"),
            Some(NVML_ERROR_TIMEOUT)
        );
        assert_eq!(
            error_by_name("not_supported"),
            Some(NVML_ERROR_NOT_SUPPORTED)
        );
        assert_eq!(error_by_name("UNKNOWN"), Some(NVML_ERROR_UNKNOWN));
        assert_eq!(error_by_name("BOGUS"), None);
    }
}
