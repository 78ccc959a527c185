//! stallmon's kubelet pod-resources client (monitor-userspace/src/podresources.rs) against the
//! stand-in kubelet of `tests::podresources_standin`: a well-behaved kubelet, and kubelets that
//! are missing, hung, or answer garbage. Every failure must be a clear error within the time
//! bound, never a panic or a hang. Unprivileged; no network (unix sockets in private temp dirs).

use std::{
    path::Path,
    time::{Duration, Instant},
};

// stallmon's client, compiled in from its source: monitor-userspace has no library target. Its
// generated `api` module comes from this crate's build.rs (same .proto, client side included).
#[allow(dead_code)]
#[path = "../../monitor-userspace/src/podresources.rs"]
mod podresources;

use podresources::{Error, MAX_RESPONSE_BYTES, PodRef, list_gpu_owners, list_gpu_owners_blocking};
use tests::podresources_standin::{Behaviour, Standin, gpu_pod, pod};

const TIMEOUT: Duration = Duration::from_secs(2);
/// What "within the bound" allows on top of the timeout (a loaded 2-core CI machine).
const SLACK: Duration = Duration::from_secs(3);

fn owner(namespace: &str, pod: &str, container: &str) -> PodRef {
    PodRef {
        pod: pod.into(),
        namespace: namespace.into(),
        container: container.into(),
    }
}

/// Runs the client against `socket` and checks that it gave up in time.
fn list_bounded(socket: &Path) -> Result<std::collections::HashMap<String, Vec<PodRef>>, Error> {
    let started = Instant::now();
    let result = list_gpu_owners_blocking(socket, TIMEOUT);
    let took = started.elapsed();
    assert!(
        took <= TIMEOUT + SLACK,
        "the client took {took:?} with a {TIMEOUT:?} timeout: {result:?}"
    );
    result
}

#[test]
fn maps_every_gpu_to_its_pod() {
    let kubelet = Standin::start(Behaviour::Serve(vec![
        gpu_pod("ml", "train-0", "trainer", &["GPU-1111", "GPU-2222"]),
        pod(
            "ml",
            "infer-0",
            &[
                ("server", "nvidia.com/mig-1g.10gb", &["MIG-3333"]),
                ("proxy", "", &[]),
            ],
        ),
        // Time-slicing: two pods on replicas of the same GPU.
        gpu_pod("team-a", "notebook-a", "jupyter", &["GPU-4444::0"]),
        gpu_pod("team-b", "notebook-b", "jupyter", &["GPU-4444::1"]),
        pod("ml", "nic-only", &[("app", "example.com/nic", &["eth3"])]),
        pod("kube-system", "coredns-1", &[("coredns", "", &[])]),
    ]))
    .unwrap();
    let owners = list_bounded(kubelet.socket()).unwrap();
    println!("{owners:#?}");
    assert_eq!(owners.len(), 4, "{owners:?}");
    assert_eq!(owners["GPU-1111"], [owner("ml", "train-0", "trainer")]);
    assert_eq!(owners["GPU-2222"], [owner("ml", "train-0", "trainer")]);
    assert_eq!(owners["MIG-3333"], [owner("ml", "infer-0", "server")]);
    assert_eq!(
        owners["GPU-4444"],
        [
            owner("team-a", "notebook-a", "jupyter"),
            owner("team-b", "notebook-b", "jupyter")
        ]
    );
    assert_eq!(kubelet.calls(), 1, "one List call");
}

#[test]
fn works_from_async_code_too() {
    let kubelet =
        Standin::start(Behaviour::Serve(vec![gpu_pod("ns", "p", "c", &["GPU-9"])])).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let owners = rt
        .block_on(list_gpu_owners(kubelet.socket(), TIMEOUT))
        .unwrap();
    assert_eq!(owners["GPU-9"], [owner("ns", "p", "c")]);
}

#[test]
fn the_blocking_helper_works_from_a_multi_thread_runtime() {
    // As `stallmon node` calls it: synchronous code inside `Runtime::block_on` on a
    // multi-threaded runtime.
    let kubelet =
        Standin::start(Behaviour::Serve(vec![gpu_pod("ns", "p", "c", &["GPU-7"])])).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let socket = kubelet.socket().to_path_buf();
    let owners = rt.block_on(async move { list_bounded(&socket) }).unwrap();
    assert_eq!(owners["GPU-7"], [owner("ns", "p", "c")]);
}

#[test]
fn an_empty_node_has_no_owners() {
    let kubelet = Standin::start(Behaviour::Serve(Vec::new())).unwrap();
    assert!(list_bounded(kubelet.socket()).unwrap().is_empty());
}

#[test]
fn a_missing_socket_is_a_clear_error() {
    let dir = tests::scratch_dir("podresources-missing");
    let socket = dir.join("no-kubelet-here.sock");
    let _ = std::fs::remove_file(&socket);
    let e = list_bounded(&socket).unwrap_err();
    println!("{e}");
    assert!(matches!(e, Error::SocketMissing(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("does not exist"), "{msg}");
    assert!(msg.contains(&socket.display().to_string()), "{msg}");
}

#[test]
fn a_socket_nobody_listens_on_is_unreachable() {
    // The socket file stays behind when its listener is closed (a kubelet that died).
    let dir = tests::scratch_dir("podresources-stale");
    let socket = dir.join("kubelet.sock");
    let _ = std::fs::remove_file(&socket);
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let e = list_bounded(&socket).unwrap_err();
    let _ = std::fs::remove_file(&socket);
    println!("{e}");
    match &e {
        Error::Unreachable { source, .. } => {
            assert_eq!(
                source.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "{e:?}"
            )
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

#[test]
fn a_kubelet_that_never_answers_times_out_within_the_bound() {
    let kubelet = Standin::start(Behaviour::Silent).unwrap();
    let started = Instant::now();
    let e = list_bounded(kubelet.socket()).unwrap_err();
    let took = started.elapsed();
    println!("after {took:?}: {e}");
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(e.to_string().contains("timed out"), "{e}");
    assert!(
        took >= TIMEOUT - Duration::from_millis(50),
        "gave up too early: {took:?}"
    );
    assert!(kubelet.calls() >= 1, "the client never connected");
}

#[test]
fn bytes_that_are_not_http2_are_an_error() {
    let mut garbage = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec();
    garbage.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    let kubelet = Standin::start(Behaviour::RawBytes(garbage)).unwrap();
    let e = list_bounded(kubelet.socket()).unwrap_err();
    println!("{e}");
    assert!(
        matches!(e, Error::Rpc { .. } | Error::Transport { .. }),
        "{e:?}"
    );
}

#[test]
fn a_message_that_is_not_protobuf_is_an_error() {
    // Field 1 (pod_resources, length-delimited) announcing 200 bytes, followed by 3: truncated.
    let kubelet = Standin::start(Behaviour::GrpcPayload {
        payload: vec![0x0a, 0xc8, 0x01, 0xff, 0xff, 0xff],
        declared_len: None,
    })
    .unwrap();
    let e = list_bounded(kubelet.socket()).unwrap_err();
    println!("{e}");
    match &e {
        Error::Rpc { status, .. } => assert_eq!(status.code(), tonic::Code::Internal, "{e}"),
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

#[test]
fn a_frame_announcing_gigabytes_is_refused_without_reading_them() {
    let kubelet = Standin::start(Behaviour::GrpcPayload {
        payload: vec![0; 16],
        declared_len: Some(u32::MAX),
    })
    .unwrap();
    let e = list_bounded(kubelet.socket()).unwrap_err();
    println!("{e}");
    match &e {
        Error::Rpc { status, .. } => {
            assert_eq!(status.code(), tonic::Code::OutOfRange, "{e}");
        }
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

#[test]
fn an_oversized_answer_is_refused() {
    use prost::Message as _;
    // A valid answer just over the client's limit: many pods with long names.
    let name = "p".repeat(200);
    let pods: Vec<_> = (0..12_000)
        .map(|i| gpu_pod(&name, &format!("{name}{i}"), "c", &[&format!("GPU-{i}")]))
        .collect();
    let size = tests::podresources_standin::api::ListPodResourcesResponse {
        pod_resources: pods.clone(),
    }
    .encoded_len();
    assert!(
        size > MAX_RESPONSE_BYTES && size < 2 * MAX_RESPONSE_BYTES,
        "{size} bytes: not just over the limit"
    );
    let kubelet = Standin::start(Behaviour::Serve(pods)).unwrap();
    let e = match list_bounded(kubelet.socket()) {
        Ok(owners) => panic!("a {size}-byte answer was accepted ({} GPUs)", owners.len()),
        Err(e) => e,
    };
    println!("{e}");
    match &e {
        Error::Rpc { status, .. } => {
            assert_eq!(status.code(), tonic::Code::OutOfRange, "{e}");
            assert!(status.message().contains("too large"), "{e}");
        }
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

#[test]
fn the_standin_also_answers_get_and_allocatable() {
    // The stand-in implements the whole v1 service; the two calls stallmon does not use are
    // checked through the service trait so that a broken stand-in is noticed here.
    use tests::podresources_standin::{Kubelet, PodResourcesLister, api};
    let kubelet = Kubelet::new(vec![
        gpu_pod("ml", "train-0", "trainer", &["GPU-1"]),
        gpu_pod("ml", "train-1", "trainer", &["GPU-2", "GPU-3"]),
    ]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let get = |name: &str| api::GetPodResourcesRequest {
            pod_name: name.into(),
            pod_namespace: "ml".into(),
        };
        let found = kubelet
            .get(tonic::Request::new(get("train-1")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(found.pod_resources.unwrap().name, "train-1");
        let missing = kubelet
            .get(tonic::Request::new(get("nope")))
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound);
        let alloc = kubelet
            .get_allocatable_resources(tonic::Request::new(api::AllocatableResourcesRequest {}))
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<&str> = alloc
            .devices
            .iter()
            .flat_map(|d| d.device_ids.iter().map(String::as_str))
            .collect();
        assert_eq!(ids, ["GPU-1", "GPU-2", "GPU-3"]);
    });
}
