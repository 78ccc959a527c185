//! The HTTP endpoint: `/metrics` for Prometheus and a small index page.
use std::net::SocketAddr;

use anyhow::{Result, anyhow};
use axum::{Router, http::header, response::IntoResponse, routing::get};
use prometheus::Registry;
use tokio::net::TcpListener;

/// Binds `addr` now, so that a port in use is reported before anything is loaded.
pub fn bind_std(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow!("cannot listen on {addr}: address already in use (pick another with --listen)")
        } else {
            anyhow!("cannot listen on {addr}: {e}")
        }
    })?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Registry) -> Result<()> {
    let app = Router::new()
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
            "/",
            get(|| async { "stallmon: why are our GPUs idle?\nMetrics: /metrics\n" }),
        );
    axum::serve(listener, app).await?;
    Ok(())
}
