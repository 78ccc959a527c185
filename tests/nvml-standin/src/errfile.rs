//! Injected failures: the optional `gpu<i>/error` file.

use crate::ffi::{NVML_ERROR_GPU_IS_LOST, error_by_name, nvmlReturn_t};

/// A parsed `error` file: calls it applies to fail with `code`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorRule {
    pub code: nvmlReturn_t,
    /// NVML function names it applies to; `None`: every call on the GPU.
    pub functions: Option<Vec<String>>,
}

/// Parses an `error` file: `<ERROR_NAME> [<function>[,<function>...]]`.
///
/// `Ok(None)` for an empty file (e.g. one being written). The error name is an NVML return code
/// name with or without its `NVML_ERROR_` prefix (`GPU_IS_LOST`, `NOT_SUPPORTED`, `UNKNOWN`,
/// `TIMEOUT`, ...). Function names may be separated by commas and/or whitespace.
pub fn parse_error_file(text: &str) -> Result<Option<ErrorRule>, String> {
    let mut words = text.split_whitespace();
    let Some(name) = words.next() else {
        return Ok(None);
    };
    let code = error_by_name(name).ok_or_else(|| format!("unknown NVML error name {name:?}"))?;
    let functions: Vec<String> = words
        .flat_map(|w| w.split(','))
        .filter(|f| !f.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(Some(ErrorRule {
        code,
        functions: (!functions.is_empty()).then_some(functions),
    }))
}

impl ErrorRule {
    /// Whether a call of `function` on this GPU fails. `lookup`: the call is a handle lookup
    /// (`nvmlDeviceGetHandleBy*`), which, without a function list, only `GPU_IS_LOST` affects.
    /// A listed name without version suffix also matches the versioned function
    /// (`nvmlDeviceGetComputeRunningProcesses` matches `..._v3`).
    pub fn applies(&self, function: &str, lookup: bool) -> bool {
        match &self.functions {
            None => !lookup || self.code == NVML_ERROR_GPU_IS_LOST,
            Some(list) => list
                .iter()
                .any(|f| f == function || f == strip_version(function)),
        }
    }
}

/// `name` without a trailing `_v<digits>`.
fn strip_version(name: &str) -> &str {
    match name.rsplit_once("_v") {
        Some((base, v)) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::*;

    #[test]
    fn parses_error_files() {
        assert_eq!(parse_error_file(""), Ok(None));
        assert_eq!(parse_error_file(" \n"), Ok(None));
        assert_eq!(
            parse_error_file("GPU_IS_LOST\n"),
            Ok(Some(ErrorRule {
                code: NVML_ERROR_GPU_IS_LOST,
                functions: None
            }))
        );
        assert_eq!(
            parse_error_file("NOT_SUPPORTED nvmlDeviceGetPowerUsage,nvmlDeviceGetTemperature\n"),
            Ok(Some(ErrorRule {
                code: NVML_ERROR_NOT_SUPPORTED,
                functions: Some(vec![
                    "nvmlDeviceGetPowerUsage".into(),
                    "nvmlDeviceGetTemperature".into()
                ])
            }))
        );
        assert_eq!(
            parse_error_file("NVML_ERROR_TIMEOUT a, b")
                .unwrap()
                .unwrap()
                .functions,
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            parse_error_file("UNKNOWN").unwrap().unwrap().code,
            NVML_ERROR_UNKNOWN
        );
        assert!(parse_error_file("ON_FIRE").is_err());
    }

    #[test]
    fn scope_of_a_rule() {
        let lost = parse_error_file("GPU_IS_LOST").unwrap().unwrap();
        assert!(lost.applies("nvmlDeviceGetUUID", false));
        assert!(lost.applies("nvmlDeviceGetHandleByIndex_v2", true));

        let unsupported = parse_error_file("NOT_SUPPORTED").unwrap().unwrap();
        assert!(unsupported.applies("nvmlDeviceGetSamples", false));
        assert!(!unsupported.applies("nvmlDeviceGetHandleByIndex_v2", true));

        let listed = parse_error_file(
            "TIMEOUT nvmlDeviceGetComputeRunningProcesses,nvmlDeviceGetHandleByIndex_v2",
        )
        .unwrap()
        .unwrap();
        assert!(listed.applies("nvmlDeviceGetComputeRunningProcesses_v3", false));
        assert!(listed.applies("nvmlDeviceGetComputeRunningProcesses_v2", false));
        assert!(listed.applies("nvmlDeviceGetHandleByIndex_v2", true));
        assert!(!listed.applies("nvmlDeviceGetHandleByUUID", true));
        assert!(!listed.applies("nvmlDeviceGetSamples", false));

        let exact = parse_error_file("UNKNOWN nvmlDeviceGetPciInfo_v3")
            .unwrap()
            .unwrap();
        assert!(exact.applies("nvmlDeviceGetPciInfo_v3", false));
        assert!(!exact.applies("nvmlDeviceGetPciInfo", false));
    }

    #[test]
    fn version_suffixes() {
        assert_eq!(strip_version("nvmlInit_v2"), "nvmlInit");
        assert_eq!(
            strip_version("nvmlDeviceGetPciInfo_v3"),
            "nvmlDeviceGetPciInfo"
        );
        assert_eq!(
            strip_version("nvmlDeviceGetSamples"),
            "nvmlDeviceGetSamples"
        );
        assert_eq!(strip_version("x_v"), "x_v");
        assert_eq!(
            strip_version("nvmlDeviceGetHandleByUUIDV"),
            "nvmlDeviceGetHandleByUUIDV"
        );
    }
}
