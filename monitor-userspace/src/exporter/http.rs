//! The HTTP endpoint: `/metrics` for Prometheus, `/healthz` for probes, a small index page.
//!
//! It runs next to other users' jobs, so it is built to survive them: a request's headers must
//! arrive within [`HEADER_TIMEOUT`] (hyper's own timer), at most [`MAX_CONNECTIONS`] connections
//! are held at once (the tracer keeps its file descriptors), and when that many are open the
//! connection that has been idle the longest is closed to make room: a flood of sockets that
//! never send a request cannot keep a scraper out. Shutdown is graceful: the listener closes,
//! requests in flight get [`DRAIN`] to finish.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus::Registry;
use tokio::{net::TcpListener, sync::watch, task::AbortHandle};

use crate::gpu::monotonic_ns;

/// A request's headers must arrive within this time.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections held at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Time requests in flight get at shutdown.
pub const DRAIN: Duration = Duration::from_secs(2);

/// Why the endpoint could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {0}: address already in use (pick another with --listen)")]
    InUse(SocketAddr),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// Binds `addr` now, so that a port in use is reported before anything is loaded.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, HttpError> {
    let l = std::net::TcpListener::bind(addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            HttpError::InUse(addr)
        } else {
            HttpError::Bind(addr, e)
        }
    })?;
    l.set_nonblocking(true)
        .map_err(|e| HttpError::Bind(addr, e))?;
    Ok(l)
}

/// Liveness as `/healthz` reports it: 200 while the programs are attached and the collector
/// has refreshed the figures recently, 503 otherwise.
pub struct Health {
    attached: AtomicBool,
    updated_ns: AtomicU64,
    max_age_ns: u64,
}

impl Health {
    pub fn new(max_age: Duration) -> Arc<Self> {
        Arc::new(Self {
            attached: AtomicBool::new(false),
            updated_ns: AtomicU64::new(0),
            max_age_ns: max_age.as_nanos().min(u64::MAX as u128) as u64,
        })
    }

    pub fn set_attached(&self, v: bool) {
        self.attached.store(v, Ordering::Relaxed);
    }

    /// The collector just refreshed the figures.
    pub fn touch(&self) {
        self.updated_ns.store(monotonic_ns(), Ordering::Relaxed);
    }

    /// `Ok` when healthy, else why not.
    pub fn check(&self) -> Result<(), String> {
        if !self.attached.load(Ordering::Relaxed) {
            return Err("eBPF programs not attached".into());
        }
        let last = self.updated_ns.load(Ordering::Relaxed);
        let age = monotonic_ns().saturating_sub(last);
        if last == 0 || age > self.max_age_ns {
            return Err(format!(
                "figures not refreshed for {:.1} s",
                age as f64 * 1e-9
            ));
        }
        Ok(())
    }
}

fn router(registry: Registry, health: Arc<Health>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
                        super::metrics::render(&registry),
                    )
                        .into_response()
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let health = health.clone();
                async move {
                    match health.check() {
                        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("unhealthy: {why}\n"),
                        ),
                    }
                }
            }),
        )
        .route(
            "/",
            get(|| async {
                "stallmon: why are our GPUs idle?\nMetrics: /metrics\nHealth: /healthz\n"
            }),
        )
}

/// Connections held, by accept order: whether each is serving a request now.
#[derive(Default)]
struct Conns {
    next: u64,
    open: BTreeMap<u64, (AbortHandle, Arc<AtomicBool>)>,
}

impl Conns {
    /// Closes the oldest connection that is not serving a request; false if there is none.
    fn evict_idle(&mut self) -> bool {
        let victim = self
            .open
            .iter()
            .find(|(_, (_, busy))| !busy.load(Ordering::Relaxed))
            .map(|(id, _)| *id);
        match victim.and_then(|id| self.open.remove(&id)) {
            Some((abort, _)) => {
                abort.abort();
                true
            }
            None => false,
        }
    }
}

/// Serves until `shutdown` turns true, then drains.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = router(registry, health);
    let conns = Arc::new(Mutex::new(Conns::default()));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors (EMFILE/ENFILE): make room and back off.
                tracing::debug!("accept: {e}");
                conns.lock().map(|mut c| c.evict_idle()).ok();
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(mut c) = conns.lock() else { break };
        if c.open.len() >= MAX_CONNECTIONS && !c.evict_idle() {
            continue; // every connection is serving a request: drop this one
        }
        let id = c.next;
        c.next += 1;
        let busy = Arc::new(AtomicBool::new(false));
        let svc = {
            let app = app.clone();
            let busy = busy.clone();
            tower::service_fn(move |req| {
                let app = app.clone();
                let busy = busy.clone();
                async move {
                    busy.store(true, Ordering::Relaxed);
                    let r = tower::ServiceExt::oneshot(app, req).await;
                    busy.store(false, Ordering::Relaxed);
                    r
                }
            })
        };
        let conns_done = conns.clone();
        let task = tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
            let _ = conn.await;
            if let Ok(mut c) = conns_done.lock() {
                c.open.remove(&id);
            }
        });
        c.open.insert(id, (task.abort_handle(), busy));
    }
    // Graceful: no new connections; requests in flight finish within DRAIN.
    drop(listener);
    let deadline = tokio::time::Instant::now() + DRAIN;
    while tokio::time::Instant::now() < deadline {
        let serving = conns
            .lock()
            .map(|c| c.open.values().any(|(_, b)| b.load(Ordering::Relaxed)))
            .unwrap_or(false);
        if !serving {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Ok(mut c) = conns.lock() {
        for (_, (abort, _)) in std::mem::take(&mut c.open) {
            abort.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_needs_attach_and_fresh_figures() {
        let h = Health::new(Duration::from_millis(200));
        assert!(h.check().unwrap_err().contains("not attached"));
        h.set_attached(true);
        assert!(h.check().unwrap_err().contains("not refreshed"));
        h.touch();
        assert!(h.check().is_ok());
        std::thread::sleep(Duration::from_millis(250));
        assert!(h.check().is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn half_open_sockets_do_not_block_a_scrape() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let std_listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let listener = TcpListener::from_std(std_listener).unwrap();
        let health = Health::new(Duration::from_secs(60));
        let (tx, rx) = watch::channel(false);
        let server = tokio::spawn(serve(listener, Registry::new(), health, rx));
        // More silent connections than the server holds.
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 200 {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let t0 = std::time::Instant::now();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        tokio::time::timeout(Duration::from_secs(1), s.read_to_string(&mut body))
            .await
            .expect("answered within 1 s")
            .unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(t0.elapsed() < Duration::from_secs(1));
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("graceful shutdown")
            .unwrap();
    }
}
