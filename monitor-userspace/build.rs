//! Builds the kernel programs (`monitor-ebpf`, target bpfel-unknown-none) with aya-build and puts
//! the object in OUT_DIR, where `src/kernel/mod.rs` embeds it.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build (for quick unit tests of pure user-space logic); the
//! binary then carries an empty object and `stallmon trace` says so instead of loading.
//!
//! It also generates the client of the kubelet pod-resources gRPC API (`src/podresources.rs`) from
//! the vendored `proto/podresources/v1/api.proto`, always (with or without `AYA_BUILD_SKIP`).
use std::{env, fs, path::PathBuf};

/// Rust types and the `PodResourcesLister` client for the vendored kubelet API, into
/// `OUT_DIR/v1.rs`. protox parses the .proto in pure Rust: no `protoc` needed.
fn podresources_api() -> anyhow::Result<()> {
    const PROTO: &str = "proto/podresources/v1/api.proto";
    println!("cargo::rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}

/// The source revision, for `--version` and `stallmon_build_info`: `$STALLMON_REVISION` (source
/// tarballs, container builds), else `git rev-parse`, else "unknown".
fn revision() {
    println!("cargo::rerun-if-env-changed=STALLMON_REVISION");
    let git = concat!(env!("CARGO_MANIFEST_DIR"), "/../.git");
    println!("cargo::rerun-if-changed={git}/HEAD");
    println!("cargo::rerun-if-changed={git}/refs");
    let rev = env::var("STALLMON_REVISION")
        .ok()
        .filter(|r| {
            !r.is_empty()
                && r.len() <= 64
                && r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        })
        .or_else(|| {
            let out = std::process::Command::new("git")
                .args([
                    "-C",
                    env!("CARGO_MANIFEST_DIR"),
                    "rev-parse",
                    "--short=12",
                    "HEAD",
                ])
                .output()
                .ok()?;
            let r = String::from_utf8(out.stdout).ok()?.trim().to_string();
            (out.status.success() && !r.is_empty()).then_some(r)
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo::rustc-env=STALLMON_REVISION={rev}");
}

fn main() -> anyhow::Result<()> {
    revision();
    podresources_api()?;
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
