//! Builds the kernel programs (`monitor-ebpf`, target bpfel-unknown-none) with aya-build and puts
//! the object in OUT_DIR, where `src/kernel/loader.rs` embeds it.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build (for quick unit tests of pure user-space logic); the
//! binary then carries an empty object and `stallmon trace` says so instead of loading.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out = PathBuf::from(env::var("OUT_DIR")?).join("monitor");
        if !out.exists() {
            fs::write(&out, b"")?;
        }
        println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let ebpf = aya_build::Package {
        name: "monitor-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../monitor-ebpf"),
        ..Default::default()
    };
    // Build the kernel crate with the same pinned toolchain (rust-toolchain.toml). aya-build adds
    // `-Z build-std=core` when RUSTC_BOOTSTRAP=1; set it only for that child build, not for the
    // host crates (some of them probe for nightly features and would change behaviour).
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain = env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "1.98.0".into());
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(&toolchain))
}
