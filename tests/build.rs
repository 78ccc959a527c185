//! Generates the kubelet pod-resources gRPC API (`v1.PodResourcesLister`) from the same vendored
//! .proto as stallmon's build: the server side for the stand-in kubelet of
//! `src/podresources_standin.rs`, the client side for stallmon's own client module, which
//! `tests/podresources.rs` compiles in by path (monitor-userspace is a binary-only crate). protox
//! parses the .proto in pure Rust: no `protoc` needed.
fn main() -> anyhow::Result<()> {
    const PROTO: &str = "../monitor-userspace/proto/podresources/v1/api.proto";
    println!("cargo::rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["../monitor-userspace/proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
