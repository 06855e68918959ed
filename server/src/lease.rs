//! The control lease: at most one control server per PostgreSQL database, and a standby that
//! takes over when it goes.
//!
//! The lease is a session-level PostgreSQL advisory lock ([`LEASE_KEY`]) held on a connection
//! of its own. A server started with `--lease` waits as a standby until it can take the lock,
//! then runs as the control server. PostgreSQL releases the lock when the holder's session
//! ends: its process exits or dies, its host goes away (once the database's TCP keepalive
//! notices), or its connection breaks. The holder checks its session every
//! [`CHECK_EVERY`]; when the check fails or times out, the lease may already be another
//! server's, so the holder stops at once rather than act beside the new control server
//! (its service manager restarts it, as a standby).

use std::time::Duration;

use tokio_postgres::NoTls;

use crate::db::DbError;

/// The advisory lock's key: "mcastctl" in ASCII.
pub const LEASE_KEY: i64 = 0x6d63_6173_7463_746c;
/// How often a standby tries to take the lease.
pub const RETRY_EVERY: Duration = Duration::from_millis(500);
/// How often the holder checks that its session, and so the lease, is still there.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a check may take before the holder counts the lease as lost.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The control lease, held.
pub struct Lease {
    client: tokio_postgres::Client,
    connection: tokio::task::JoinHandle<()>,
}

/// A connection of the lease's own (not the store's pool: the lock lives as long as it).
async fn connect(
    url: &str,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), DbError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    let connection = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "the lease's database connection ended");
        }
    });
    Ok((client, connection))
}

impl Lease {
    /// Takes the lease on the database at `url`, waiting while another server holds it;
    /// `waiting` is called once when it must wait.
    pub async fn acquire(url: &str, waiting: impl FnOnce()) -> Result<Lease, DbError> {
        let mut waiting = Some(waiting);
        loop {
            let (client, connection) = connect(url).await?;
            loop {
                let row = client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&LEASE_KEY])
                    .await;
                match row {
                    Ok(row) if row.get::<_, bool>(0) => {
                        tracing::info!("control lease taken");
                        return Ok(Lease { client, connection });
                    }
                    Ok(_) => {}
                    // The connection broke: open another.
                    Err(e) if client.is_closed() => {
                        tracing::warn!(error = %e, "lease connection lost; reconnecting");
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
                if let Some(w) = waiting.take() {
                    w();
                }
                tokio::time::sleep(RETRY_EVERY).await;
            }
            connection.abort();
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    /// Watches the lease until it may be lost; returns why. The holder must stop acting as
    /// the control server when this returns.
    pub async fn lost(self) -> String {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        loop {
            tick.tick().await;
            let check = tokio::time::timeout(CHECK_TIMEOUT, self.client.simple_query("SELECT 1"));
            match check.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return format!("the lease's session failed: {e}"),
                Err(_) => {
                    return format!(
                        "the lease's session did not answer within {} s",
                        CHECK_TIMEOUT.as_secs()
                    )
                }
            }
            if self.connection.is_finished() {
                return "the lease's connection ended".into();
            }
        }
    }
}
