//! Which Kubernetes pod holds which GPU: the kubelet pod-resources gRPC API (v1), the same source
//! dcgm-exporter uses.
//!
//! The kubelet serves `v1.PodResourcesLister` on a unix socket (by default
//! [`DEFAULT_SOCKET`]; a DaemonSet mounts `/var/lib/kubelet/pod-resources` read-only). Its `List`
//! call returns every pod on the node with, per container, the devices the device plugins
//! allocated. For NVIDIA GPUs the resource is `nvidia.com/gpu` (`nvidia.com/gpu.shared` with
//! renamed time-slicing, `nvidia.com/mig-<profile>` with the MIG "mixed" strategy) and the device ids are what the NVIDIA device plugin advertises:
//! GPU UUIDs (`GPU-…`), MIG device UUIDs (`MIG-…`), with time-slicing a replica suffix (`GPU-…::3`)
//! that [`normalize_device_id`] strips. Some plugins (e.g. GKE's) use other ids such as `nvidia0`;
//! they are passed through unchanged and simply match no NVML UUID.
//!
//! [`list_gpu_owners`] asks the kubelet once and returns device id → the pods' containers that hold
//! it ([`gpu_owners`] is the pure mapping, unit-tested). With time-slicing or MPS one GPU can be
//! held by several containers, hence a list; exclusive allocation gives exactly one.
//!
//! Everything received is treated as hostile input: the answer is limited to
//! [`MAX_RESPONSE_BYTES`], the whole exchange (connect included) to the caller's timeout, names
//! and ids that are empty, over-long or contain control characters are skipped, and nothing here
//! panics on any input. The Rust types and client are generated at build time from the vendored
//! `proto/podresources/v1/api.proto` (see `build.rs`).

use std::{
    collections::HashMap,
    fmt, io,
    path::{Path, PathBuf},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tonic::transport::{Endpoint, Uri};

/// Types and client generated from the vendored kubelet `api.proto` (package `v1`).
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod api {
    tonic::include_proto!("v1");
}

use api::pod_resources_lister_client::PodResourcesListerClient;

/// Where the kubelet serves the pod-resources API unless `--pod-resources-socket`-like
/// configuration says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";

/// Largest `List` answer accepted (bytes of the encoded message). A node with 110 pods of a few
/// containers each answers in tens of kilobytes; 4 MiB is also gRPC's usual default.
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// Longest pod, namespace or container name accepted (Kubernetes names are at most 253).
const MAX_NAME_LEN: usize = 253;
/// Longest device id accepted (a MIG UUID with a replica suffix is under 64).
const MAX_DEVICE_ID_LEN: usize = 256;

/// A container of a pod.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodRef {
    pub pod: String,
    pub namespace: String,
    pub container: String,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} ({})", self.namespace, self.pod, self.container)
    }
}

/// Why the kubelet could not be asked. The variants let a caller tell "not a Kubernetes node"
/// ([`Error::SocketMissing`]) from a kubelet that misbehaves.
#[derive(Debug)]
pub enum Error {
    /// Nothing at the socket path: no kubelet here, or its directory is not mounted.
    SocketMissing(PathBuf),
    /// The path exists but cannot be connected to (not a socket, permission, nobody listening).
    Unreachable { socket: PathBuf, source: io::Error },
    /// No complete answer within the time limit.
    Timeout { socket: PathBuf, after: Duration },
    /// The kubelet (or whatever listens there) answered with an error, a malformed or an
    /// oversized message.
    Rpc {
        socket: PathBuf,
        status: Box<tonic::Status>,
    },
    /// The HTTP/2 connection failed before any answer.
    Transport { socket: PathBuf, message: String },
    /// [`list_gpu_owners_blocking`] was called where it cannot block, or no runtime could be made.
    Runtime(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::SocketMissing(p) => write!(
                f,
                "kubelet pod-resources socket {} does not exist (not a Kubernetes node, or \
                 /var/lib/kubelet/pod-resources is not mounted into the container)",
                p.display()
            ),
            Error::Unreachable { socket, source } => write!(
                f,
                "cannot connect to the kubelet pod-resources socket {}: {source}",
                socket.display()
            ),
            Error::Timeout { socket, after } => write!(
                f,
                "the kubelet pod-resources API at {} did not answer within {after:?} (timed out)",
                socket.display()
            ),
            Error::Rpc { socket, status } => write!(
                f,
                "the kubelet pod-resources API at {} failed: {:?}: {}",
                socket.display(),
                status.code(),
                status.message()
            ),
            Error::Transport { socket, message } => write!(
                f,
                "connection to the kubelet pod-resources API at {} failed: {message}",
                socket.display()
            ),
            Error::Runtime(m) => write!(f, "pod-resources client: {m}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Unreachable { source, .. } => Some(source),
            Error::Rpc { status, .. } => Some(status.as_ref()),
            _ => None,
        }
    }
}

/// Whether a device-plugin resource name is an NVIDIA GPU or MIG slice: the prefixes NVIDIA's own
/// tools match (`nvidia.com/gpu`, also `nvidia.com/gpu.shared` of time-slicing with
/// `renameByDefault`, and `nvidia.com/mig-<profile>`).
pub fn is_gpu_resource(resource_name: &str) -> bool {
    resource_name.starts_with("nvidia.com/gpu") || resource_name.starts_with("nvidia.com/mig-")
}

/// The GPU id in a device-plugin device id: trimmed, with a time-slicing replica suffix
/// (`GPU-…::3`) removed. `None` for ids that are empty, over-long or contain control characters.
pub fn normalize_device_id(id: &str) -> Option<&str> {
    let id = id.trim();
    let id = match id.rsplit_once("::") {
        Some((base, replica))
            if !replica.is_empty() && replica.bytes().all(|b| b.is_ascii_digit()) =>
        {
            base
        }
        _ => id,
    };
    (!id.is_empty() && id.len() <= MAX_DEVICE_ID_LEN && !id.chars().any(char::is_control))
        .then_some(id)
}

fn sane_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_LEN && !s.chars().any(char::is_control)
}

/// Device id → the containers holding it, for the GPU resources of a `List` answer. Each list is
/// sorted and without duplicates. Pods or containers with unusable names, and unusable device
/// ids, are skipped.
pub fn gpu_owners(resp: &api::ListPodResourcesResponse) -> HashMap<String, Vec<PodRef>> {
    let mut owners: HashMap<String, Vec<PodRef>> = HashMap::new();
    for pod in &resp.pod_resources {
        if !sane_name(&pod.name) || !sane_name(&pod.namespace) {
            continue;
        }
        for c in &pod.containers {
            if !sane_name(&c.name) {
                continue;
            }
            for dev in c
                .devices
                .iter()
                .filter(|d| is_gpu_resource(&d.resource_name))
            {
                for id in dev
                    .device_ids
                    .iter()
                    .filter_map(|id| normalize_device_id(id))
                {
                    owners.entry(id.to_string()).or_default().push(PodRef {
                        pod: pod.name.clone(),
                        namespace: pod.namespace.clone(),
                        container: c.name.clone(),
                    });
                }
            }
        }
    }
    for refs in owners.values_mut() {
        refs.sort();
        refs.dedup();
    }
    owners
}

/// The first `std::io::Error` in an error's source chain.
fn io_error_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

/// The full error chain in one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(err) = cur {
        let s = err.to_string();
        if parts.last() != Some(&s) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

async fn list(socket: &Path, timeout: Duration) -> Result<api::ListPodResourcesResponse, Error> {
    let path = socket.to_path_buf();
    // The URI is only used for the :authority header; the connector ignores it.
    let channel = Endpoint::from_static("http://localhost")
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| match io_error_in(&e) {
            Some(io) => Error::Unreachable {
                socket: socket.to_path_buf(),
                source: io::Error::new(io.kind(), io.to_string()),
            },
            None => Error::Transport {
                socket: socket.to_path_buf(),
                message: chain(&e),
            },
        })?;
    let mut client =
        PodResourcesListerClient::new(channel).max_decoding_message_size(MAX_RESPONSE_BYTES);
    let resp = client
        .list(api::ListPodResourcesRequest {})
        .await
        .map_err(|status| Error::Rpc {
            socket: socket.to_path_buf(),
            status: Box::new(status),
        })?;
    Ok(resp.into_inner())
}

/// Asks the kubelet at `socket` which pods hold which GPUs (see [`gpu_owners`]). The whole
/// exchange, connection included, is bounded by `timeout`. Needs a Tokio runtime with I/O and
/// time enabled.
pub async fn list_gpu_owners(
    socket: &Path,
    timeout: Duration,
) -> Result<HashMap<String, Vec<PodRef>>, Error> {
    match std::fs::metadata(socket) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::SocketMissing(socket.to_path_buf()));
        }
        Err(source) => {
            return Err(Error::Unreachable {
                socket: socket.to_path_buf(),
                source,
            });
        }
        Ok(_) => {}
    }
    match tokio::time::timeout(timeout, list(socket, timeout)).await {
        Ok(Ok(resp)) => Ok(gpu_owners(&resp)),
        Ok(Err(Error::Rpc { status, .. }))
            if matches!(
                status.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ) =>
        {
            Err(Error::Timeout {
                socket: socket.to_path_buf(),
                after: timeout,
            })
        }
        Ok(Err(e)) => Err(e),
        Err(_elapsed) => Err(Error::Timeout {
            socket: socket.to_path_buf(),
            after: timeout,
        }),
    }
}

/// [`list_gpu_owners`] for synchronous callers. Outside any Tokio runtime it runs on a private
/// single-threaded runtime; on a multi-threaded runtime (synchronous code called from a task) it
/// blocks in place on that runtime ([`tokio::task::block_in_place`]), so it also works from
/// synchronous code inside `Runtime::block_on`. On a current-thread runtime, which cannot block,
/// it returns [`Error::Runtime`] instead of panicking: await [`list_gpu_owners`] there.
pub fn list_gpu_owners_blocking(
    socket: &Path,
    timeout: Duration,
) -> Result<HashMap<String, Vec<PodRef>>, Error> {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        return match handle.runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| handle.block_on(list_gpu_owners(socket, timeout)))
            }
            _ => Err(Error::Runtime(
                "list_gpu_owners_blocking called on a current-thread Tokio runtime, which cannot \
                 block; await list_gpu_owners instead"
                    .into(),
            )),
        };
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Runtime(format!("cannot start a runtime: {e}")))?;
    rt.block_on(list_gpu_owners(socket, timeout))
}

#[cfg(test)]
mod tests {
    use super::api::*;
    use super::*;

    fn devices(resource: &str, ids: &[&str]) -> ContainerDevices {
        ContainerDevices {
            resource_name: resource.into(),
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
            topology: None,
        }
    }

    fn container(name: &str, devs: Vec<ContainerDevices>) -> ContainerResources {
        ContainerResources {
            name: name.into(),
            devices: devs,
            ..Default::default()
        }
    }

    fn pod(ns: &str, name: &str, containers: Vec<ContainerResources>) -> PodResources {
        PodResources {
            name: name.into(),
            namespace: ns.into(),
            containers,
            ..Default::default()
        }
    }

    fn owner(ns: &str, pod: &str, c: &str) -> PodRef {
        PodRef {
            pod: pod.into(),
            namespace: ns.into(),
            container: c.into(),
        }
    }

    #[test]
    fn maps_gpus_to_containers() {
        let resp = ListPodResourcesResponse {
            pod_resources: vec![
                pod(
                    "ml",
                    "train-0",
                    vec![
                        container(
                            "trainer",
                            vec![
                                devices("nvidia.com/gpu", &["GPU-aaaa", "GPU-bbbb"]),
                                devices("example.com/nic", &["eth7"]),
                            ],
                        ),
                        container("sidecar", vec![]),
                    ],
                ),
                pod(
                    "ml",
                    "infer-1",
                    vec![container(
                        "server",
                        vec![devices("nvidia.com/mig-1g.10gb", &["MIG-cccc"])],
                    )],
                ),
                pod("kube-system", "coredns", vec![container("coredns", vec![])]),
            ],
        };
        let m = gpu_owners(&resp);
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(m["GPU-aaaa"], [owner("ml", "train-0", "trainer")]);
        assert_eq!(m["GPU-bbbb"], [owner("ml", "train-0", "trainer")]);
        assert_eq!(m["MIG-cccc"], [owner("ml", "infer-1", "server")]);
        assert!(!m.contains_key("eth7"), "non-GPU resources are ignored");
    }

    #[test]
    fn time_slicing_replicas_share_a_gpu() {
        let resp = ListPodResourcesResponse {
            pod_resources: vec![
                pod(
                    "a",
                    "p1",
                    vec![container(
                        "c",
                        vec![devices("nvidia.com/gpu", &["GPU-x::0"])],
                    )],
                ),
                pod(
                    "a",
                    "p0",
                    vec![container(
                        "c",
                        // Two replicas of the same GPU in one container: one owner entry.
                        vec![devices("nvidia.com/gpu", &["GPU-x::1", "GPU-x::2"])],
                    )],
                ),
            ],
        };
        let m = gpu_owners(&resp);
        assert_eq!(m.len(), 1);
        assert_eq!(m["GPU-x"], [owner("a", "p0", "c"), owner("a", "p1", "c")]);
    }

    #[test]
    fn device_id_normalization() {
        assert_eq!(normalize_device_id("GPU-1234"), Some("GPU-1234"));
        assert_eq!(normalize_device_id(" GPU-1234 "), Some("GPU-1234"));
        assert_eq!(normalize_device_id("GPU-1234::17"), Some("GPU-1234"));
        // Not a numeric replica suffix: kept as is.
        assert_eq!(normalize_device_id("GPU-1234::x"), Some("GPU-1234::x"));
        assert_eq!(normalize_device_id("nvidia0"), Some("nvidia0"));
        assert_eq!(normalize_device_id(""), None);
        assert_eq!(normalize_device_id("::3"), None);
        assert_eq!(normalize_device_id("GPU-\n1"), None);
        assert_eq!(
            normalize_device_id(&"G".repeat(MAX_DEVICE_ID_LEN + 1)),
            None
        );
    }

    #[test]
    fn hostile_names_are_skipped() {
        let long = "p".repeat(MAX_NAME_LEN + 1);
        let resp = ListPodResourcesResponse {
            pod_resources: vec![
                pod(
                    "ns",
                    &long,
                    vec![container("c", vec![devices("nvidia.com/gpu", &["GPU-1"])])],
                ),
                pod(
                    "",
                    "p",
                    vec![container("c", vec![devices("nvidia.com/gpu", &["GPU-2"])])],
                ),
                pod(
                    "ns",
                    "p",
                    vec![
                        container("bad\u{7}", vec![devices("nvidia.com/gpu", &["GPU-3"])]),
                        container("ok", vec![devices("nvidia.com/gpu", &["", "GPU-4"])]),
                    ],
                ),
            ],
        };
        let m = gpu_owners(&resp);
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(m["GPU-4"], [owner("ns", "p", "ok")]);
    }

    #[test]
    fn resource_names() {
        assert!(is_gpu_resource("nvidia.com/gpu"));
        assert!(is_gpu_resource("nvidia.com/mig-3g.40gb"));
        assert!(is_gpu_resource("nvidia.com/gpu.shared"));
        assert!(!is_gpu_resource("amd.com/gpu"));
        assert!(!is_gpu_resource(""));
    }

    #[test]
    fn missing_socket_is_a_clear_error() {
        let e = list_gpu_owners_blocking(
            Path::new("/nonexistent/stallmon-test/kubelet.sock"),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, Error::SocketMissing(_)), "{e:?}");
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn a_plain_file_is_not_a_socket() {
        let dir = std::env::temp_dir().join(format!("stallmon-podres-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kubelet.sock");
        std::fs::write(&file, b"not a socket").unwrap();
        let e = list_gpu_owners_blocking(&file, Duration::from_secs(2)).unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_helper_works_inside_a_multi_thread_runtime() {
        // As `stallmon node` calls it: synchronous code on a runtime worker.
        let e = list_gpu_owners_blocking(
            Path::new("/nonexistent/stallmon-test/kubelet.sock"),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, Error::SocketMissing(_)), "{e:?}");
    }

    #[tokio::test]
    async fn blocking_helper_refuses_on_a_current_thread_runtime() {
        let e = list_gpu_owners_blocking(Path::new(DEFAULT_SOCKET), Duration::from_secs(1))
            .unwrap_err();
        assert!(matches!(e, Error::Runtime(_)), "{e:?}");
    }
}
