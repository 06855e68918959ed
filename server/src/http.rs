//! The operator API's HTTP server, bounded: at most [`HttpLimits::max_connections`]
//! connections at once (more are closed as they are accepted, and counted), with a reserve
//! that only loopback peers may use so that an operator on the server's own host always gets
//! in; a request's headers must arrive within [`HttpLimits::header_timeout`] (a client that
//! trickles them, or opens a connection and sends nothing, is cut off). Shutdown stops
//! accepting and lets the connections in flight finish, for a bounded time.
//!
//! The process also raises its open-file limit to the hard limit at start
//! ([`raise_open_files`]), so that the embedded broker keeps descriptors when the API is full.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How much the operator API takes.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections at once from anywhere.
    pub max_connections: usize,
    /// More connections, for loopback peers only, once the others are used up.
    pub loopback_reserve: usize,
    /// Time for a request's headers to arrive (from the connection's start, or the end of the
    /// previous request on it).
    pub header_timeout: Duration,
    /// Time the connections in flight get to finish at shutdown.
    pub drain_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 1024,
            loopback_reserve: 32,
            header_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters of what the limits refused.
#[derive(Debug, Default)]
pub struct HttpStats {
    /// Connections closed as accepted because every permit was taken.
    pub refused: AtomicU64,
}

/// Serves `app` on `listener` within `limits` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    stats: Arc<HttpStats>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let general = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let reserve = Arc::new(Semaphore::new(limits.loopback_reserve));
    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors (EMFILE) or a connection reset before it was taken:
                    // pause rather than spin.
                    tracing::warn!(error = %e, "accepting an API connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Some(permit) = admit(&general, &reserve, peer) else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "API connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("API connections still open at shutdown were cut off");
    }
    Ok(())
}

/// A permit for a connection from `peer`: a general one, else (loopback only) a reserved one.
fn admit(
    general: &Arc<Semaphore>,
    reserve: &Arc<Semaphore>,
    peer: SocketAddr,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    general.clone().try_acquire_owned().ok().or_else(|| {
        peer.ip()
            .is_loopback()
            .then(|| reserve.clone().try_acquire_owned().ok())
            .flatten()
    })
}

/// Raises this process's soft limit of open files to its hard limit; returns the limit in
/// force (or `None` when it cannot be read).
pub fn raise_open_files() -> Option<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
        .ok()
        .or_else(|| Some(rlimit::getrlimit(rlimit::Resource::NOFILE).ok()?.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_peers_get_the_reserve_once_the_rest_is_taken() {
        let (general, reserve) = (Arc::new(Semaphore::new(1)), Arc::new(Semaphore::new(1)));
        let remote: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let first = admit(&general, &reserve, remote).expect("a general permit");
        assert!(admit(&general, &reserve, remote).is_none());
        let reserved = admit(&general, &reserve, local).expect("the loopback reserve");
        assert!(admit(&general, &reserve, local).is_none());
        drop(first);
        assert!(admit(&general, &reserve, remote).is_some());
        drop(reserved);
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let raised = raise_open_files().unwrap();
        let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
        assert_eq!((raised, soft), (hard, hard));
    }
}
