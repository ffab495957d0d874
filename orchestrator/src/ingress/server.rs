//! The ingress's HTTP server: hyper's HTTP/1 connections with a header-read timeout, a cap on
//! open connections, the peer's address for the handlers, and a graceful shutdown.
//!
//! A client that opens a connection and sends nothing, or half its headers, holds it for at
//! most `header_timeout` (hyper's timer also covers a kept-alive connection waiting for its
//! next request), and at most `max_connections` are open at once: past that, new connections
//! wait in the listen backlog until one closes. The body's and the request's own deadlines are
//! the handler's (see `receive`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Limits of the server's connections.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConnectionLimits {
    /// How long a client may take to send a request's headers (or, between requests on a
    /// kept-alive connection, to start the next).
    pub(super) header_timeout: Duration,
    /// Connections open at once.
    pub(super) max_connections: usize,
}

/// Serves `router` on `listener` within `limits` until `shutdown`, then finishes the requests
/// under way (connections are told to close after their current request).
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    info!(addr = ?addr, max_connections = limits.max_connections,
        header_timeout_ms = u64::try_from(limits.header_timeout.as_millis()).unwrap_or(u64::MAX),
        "ingress listening on POST /hooks/gitlab/{{tenant}} and /hooks/gitlab");
    // A permit per open connection; all of them back means every connection has ended.
    let permits = u32::try_from(limits.max_connections.clamp(1, 1 << 20)).unwrap_or(1 << 20);
    let open = Arc::new(Semaphore::new(permits as usize));
    loop {
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => match permit {
                Ok(p) => p,
                // The semaphore is never closed.
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, mostly: give closing connections a moment.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let service = TowerToHyperService::new(router.clone().layer(Extension(ConnectInfo(peer))));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _open = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                r = connection.as_mut() => r,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended");
            }
        });
    }
    let _all_closed = open.acquire_many(permits).await;
    Ok(())
}
