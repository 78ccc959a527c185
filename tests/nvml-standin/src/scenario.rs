//! `scenario.json`: the simulated GPUs and the sampling parameters.

use std::collections::HashSet;

use serde::Deserialize;

use crate::ffi::{NVML_DEVICE_NAME_BUFFER_SIZE, NVML_DEVICE_UUID_BUFFER_SIZE};

pub const DEFAULT_NAME: &str = "Stallmon Simulated GPU";
pub const DEFAULT_MEMORY_TOTAL_BYTES: u64 = 80 << 30;
pub const DEFAULT_SAMPLE_PERIOD_MS: u64 = 100;
pub const DEFAULT_LAG_MS: u64 = 1000;
/// Largest `sample_period_ms` and `lag_ms` accepted: one day.
pub const MAX_MS: u64 = 86_400_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    gpus: Vec<GpuFile>,
    sample_period_ms: Option<u64>,
    lag_ms: Option<u64>,
    zombie_contexts: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuFile {
    uuid: Option<String>,
    name: Option<String>,
    pci_bus_id: Option<String>,
    memory_total_bytes: Option<u64>,
}

/// A validated scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    pub gpus: Vec<GpuSpec>,
    pub sample_period_ms: u64,
    pub lag_ms: u64,
    /// A zombie keeps its contexts until it is reaped.
    pub zombie_contexts: bool,
}

/// One simulated GPU; its position in `gpus` is its NVML index and its minor number.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuSpec {
    pub uuid: String,
    pub name: String,
    pub pci: PciAddress,
    pub memory_total_bytes: u64,
}

/// A PCI address `domain:bus:device.function`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl PciAddress {
    /// Parses `DDDDDDDD:BB:DD.F` (or the legacy 4-digit-domain form), hex in any case.
    pub fn parse(s: &str) -> Option<Self> {
        let (domain, rest) = s.split_once(':')?;
        let (bus, rest) = rest.split_once(':')?;
        let (device, function) = rest.split_once('.')?;
        let hex = |x: &str, max_len: usize| {
            (!x.is_empty() && x.len() <= max_len && x.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(x, 16).ok())
                .flatten()
        };
        let pci = Self {
            domain: hex(domain, 8)?,
            bus: u8::try_from(hex(bus, 2)?).ok()?,
            device: u8::try_from(hex(device, 2)?).ok()?,
            function: u8::try_from(hex(function, 1)?).ok()?,
        };
        (pci.device < 32 && pci.function < 8).then_some(pci)
    }

    /// The address as NVML's `busId` spells it: `00000000:3B:00.0`.
    pub fn bus_id(&self) -> String {
        format!(
            "{:08X}:{:02X}:{:02X}.{:X}",
            self.domain, self.bus, self.device, self.function
        )
    }

    /// The address as NVML's `busIdLegacy` spells it: `0000:3B:00.0`.
    pub fn bus_id_legacy(&self) -> String {
        format!(
            "{:04X}:{:02X}:{:02X}.{:X}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// The UUID GPU `index` gets when the scenario gives none.
pub fn default_uuid(index: usize) -> String {
    format!("GPU-5afe0000-0000-4000-8000-{index:012x}")
}

/// The PCI address GPU `index` gets when the scenario gives none: bus `index + 1`.
pub fn default_pci(index: usize) -> PciAddress {
    let n = index + 1;
    PciAddress {
        domain: (n >> 8) as u32,
        bus: (n & 0xff) as u8,
        device: 0,
        function: 0,
    }
}

impl Scenario {
    /// Parses and validates the text of `scenario.json`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: ScenarioFile = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let sample_period_ms = file.sample_period_ms.unwrap_or(DEFAULT_SAMPLE_PERIOD_MS);
        let lag_ms = file.lag_ms.unwrap_or(DEFAULT_LAG_MS);
        if !(1..=MAX_MS).contains(&sample_period_ms) {
            return Err(format!("sample_period_ms must be 1 to {MAX_MS}"));
        }
        if lag_ms > MAX_MS {
            return Err(format!("lag_ms must be at most {MAX_MS}"));
        }
        let mut gpus = Vec::with_capacity(file.gpus.len());
        let mut uuids = HashSet::new();
        let mut pcis = HashSet::new();
        for (i, g) in file.gpus.into_iter().enumerate() {
            let uuid = g.uuid.unwrap_or_else(|| default_uuid(i));
            let name = g.name.unwrap_or_else(|| DEFAULT_NAME.to_owned());
            let pci = match g.pci_bus_id {
                None => default_pci(i),
                Some(s) => PciAddress::parse(&s).ok_or_else(|| {
                    format!("gpus[{i}].pci_bus_id {s:?} is not like \"00000000:3B:00.0\"")
                })?,
            };
            if uuid.is_empty() || uuid.len() >= NVML_DEVICE_UUID_BUFFER_SIZE || uuid.contains('\0')
            {
                return Err(format!(
                    "gpus[{i}].uuid must be 1 to {} bytes without NUL",
                    NVML_DEVICE_UUID_BUFFER_SIZE - 1
                ));
            }
            if name.len() >= NVML_DEVICE_NAME_BUFFER_SIZE || name.contains('\0') {
                return Err(format!(
                    "gpus[{i}].name must be at most {} bytes without NUL",
                    NVML_DEVICE_NAME_BUFFER_SIZE - 1
                ));
            }
            if !uuids.insert(uuid.clone()) {
                return Err(format!("gpus[{i}].uuid {uuid:?} is used twice"));
            }
            if !pcis.insert(pci) {
                return Err(format!(
                    "gpus[{i}].pci_bus_id {} is used twice",
                    pci.bus_id()
                ));
            }
            gpus.push(GpuSpec {
                uuid,
                name,
                pci,
                memory_total_bytes: g.memory_total_bytes.unwrap_or(DEFAULT_MEMORY_TOTAL_BYTES),
            });
        }
        Ok(Self {
            gpus,
            sample_period_ms,
            lag_ms,
            zombie_contexts: file.zombie_contexts.unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let s = Scenario::parse(r#"{"gpus": [{}, {"name": "X"}]}"#).unwrap();
        assert_eq!(s.sample_period_ms, 100);
        assert_eq!(s.lag_ms, 1000);
        assert!(!s.zombie_contexts);
        assert!(
            Scenario::parse(r#"{"gpus": [], "zombie_contexts": true}"#)
                .unwrap()
                .zombie_contexts
        );
        assert_eq!(s.gpus[0].uuid, "GPU-5afe0000-0000-4000-8000-000000000000");
        assert_eq!(s.gpus[1].uuid, "GPU-5afe0000-0000-4000-8000-000000000001");
        assert_eq!(s.gpus[0].name, "Stallmon Simulated GPU");
        assert_eq!(s.gpus[1].name, "X");
        assert_eq!(s.gpus[0].pci.bus_id(), "00000000:01:00.0");
        assert_eq!(s.gpus[1].pci.bus_id(), "00000000:02:00.0");
        assert_eq!(s.gpus[1].memory_total_bytes, 85_899_345_920);
        assert_eq!(default_pci(255).bus_id(), "00000001:00:00.0");
    }

    #[test]
    fn full_scenario() {
        let s = Scenario::parse(
            r#"{"gpus": [{"uuid": "GPU-5afe0000-1", "name": "N", "pci_bus_id": "00000000:3b:00.0",
                "memory_total_bytes": 1024}], "sample_period_ms": 50, "lag_ms": 0}"#,
        )
        .unwrap();
        assert_eq!((s.sample_period_ms, s.lag_ms), (50, 0));
        let g = &s.gpus[0];
        assert_eq!(g.uuid, "GPU-5afe0000-1");
        assert_eq!(g.pci.bus_id(), "00000000:3B:00.0");
        assert_eq!(g.pci.bus_id_legacy(), "0000:3B:00.0");
        assert_eq!(g.memory_total_bytes, 1024);
        assert!(Scenario::parse(r#"{"gpus": []}"#).unwrap().gpus.is_empty());
    }

    #[test]
    fn rejects_bad_scenarios() {
        for bad in [
            "",
            "{}",
            r#"{"gpus": [], "extra": 1}"#,
            r#"{"gpus": [{"uuid": "GPU-1", "colour": "red"}]}"#,
            r#"{"gpus": [], "sample_period_ms": 0}"#,
            r#"{"gpus": [], "sample_period_ms": 86400001}"#,
            r#"{"gpus": [], "lag_ms": 18446744073709551615}"#,
            r#"{"gpus": [{"pci_bus_id": "3B:00.0"}]}"#,
            r#"{"gpus": [{"pci_bus_id": "0000:3B:20.0"}]}"#,
            r#"{"gpus": [{"uuid": ""}]}"#,
            r#"{"gpus": [{"uuid": "A"}, {"uuid": "A"}]}"#,
            r#"{"gpus": [{}, {"pci_bus_id": "0:1:0.0"}]}"#,
        ] {
            assert!(Scenario::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pci_addresses() {
        let p = PciAddress::parse("0000:3B:00.0").unwrap();
        assert_eq!(p, PciAddress::parse("00000000:3b:00.0").unwrap());
        assert_eq!((p.domain, p.bus, p.device, p.function), (0, 0x3b, 0, 0));
        assert!(PciAddress::parse("0000:3B:00").is_none());
        assert!(PciAddress::parse("0000:3B:00.8").is_none());
        assert!(PciAddress::parse("0000:13B:00.0").is_none());
        assert!(PciAddress::parse("0000:+B:00.0").is_none());
    }
}
