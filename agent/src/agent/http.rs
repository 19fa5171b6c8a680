//! The agent's HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (the agent loop is
//! turning), `/readyz` (the first full sync is programmed and the pins are in place).
//! Plain HTTP/1.1 on one address; it binds to loopback unless told otherwise, since the
//! counters name every local pod.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::metrics::Metrics;

/// The loop ticks every few hundred milliseconds; this much silence means it is stuck.
const MAX_SILENCE: Duration = Duration::from_secs(30);

pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9977";

/// Binds now (so a taken port fails the start, not a later scrape) and serves in the
/// background until the runtime stops.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an HTTP connection");
                    continue;
                }
            };
            let metrics = Arc::clone(&metrics);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let metrics = Arc::clone(&metrics);
                    async move { Ok::<_, std::convert::Infallible>(respond(&req, &metrics)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "HTTP connection");
                }
            });
        }
    });
    Ok(local)
}

fn respond(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let health = metrics.health();
    let (status, body, content_type) = match req.uri().path() {
        "/metrics" => match metrics.encode() {
            Ok(text) => (
                StatusCode::OK,
                text,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            Err(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n".into(),
                "text/plain",
            ),
        },
        "/healthz" if health.alive(MAX_SILENCE) => (StatusCode::OK, "ok\n".into(), "text/plain"),
        "/healthz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "agent loop stalled\n".into(),
            "text/plain",
        ),
        "/readyz" => match health.not_ready() {
            None => (StatusCode::OK, "ready\n".into(), "text/plain"),
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{why}\n"),
                "text/plain",
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "try /metrics, /healthz or /readyz\n".into(),
            "text/plain",
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}
