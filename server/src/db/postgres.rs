//! The PostgreSQL store: the same records in tables a fleet's server replicas share.
//!
//! Each record is kept as the exact JSON the sled store keeps (a `json` column keeps its text
//! byte for byte, so signed metadata round-trips unchanged, and stays queryable with SQL's
//! JSON operators), keyed by its natural key. Every write commits on its own, so
//! [`Storage::flush`] has nothing left to do. Appends that must not race (the audit log's hash
//! chain) rely on a primary key and retry, so two replicas appending at once both succeed, in
//! some order, and the chain stays whole.

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use modelcast_proto::telemetry::{Sample, TelemetryReport};

use super::{
    decode, encode, ArtifactInfo, AuditEntry, DbError, Deployment, DeviceEntry, DirectorEntry,
    Enrolment, ModelEntry, ModelInterval, Rollout, SampleQuery, Signed, Storage, StoredSample,
};
use crate::drift::Alert;

/// Connections kept open per server.
const POOL_SIZE: usize = 16;
/// Attempts at appending to the audit log when other replicas keep winning the race.
const AUDIT_ATTEMPTS: u32 = 32;

/// The schema, created on connect when missing.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS artifacts (digest BYTEA PRIMARY KEY, info JSON NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    digest BYTEA NOT NULL, idx INTEGER NOT NULL, data BYTEA NOT NULL,
    PRIMARY KEY (digest, idx));
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL, version BIGINT NOT NULL, entry JSON NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS repo (role TEXT PRIMARY KEY, doc JSON NOT NULL);
CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, entry JSON NOT NULL);
CREATE TABLE IF NOT EXISTS enrolments (id TEXT PRIMARY KEY, entry JSON NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (seq BIGINT PRIMARY KEY, entry JSON NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (id BIGINT PRIMARY KEY, rollout JSON NOT NULL);
CREATE TABLE IF NOT EXISTS audit (seq BIGINT PRIMARY KEY, entry JSON NOT NULL, digest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS director (device TEXT PRIMARY KEY, entry JSON NOT NULL);
CREATE SEQUENCE IF NOT EXISTS ids;
CREATE TABLE IF NOT EXISTS telemetry (
    device TEXT NOT NULL, to_ms BIGINT NOT NULL, seq BIGINT NOT NULL, report JSON NOT NULL,
    PRIMARY KEY (device, to_ms, seq));
CREATE TABLE IF NOT EXISTS model_telemetry (
    model TEXT NOT NULL, to_ms BIGINT NOT NULL, device TEXT NOT NULL, seq BIGINT NOT NULL,
    slot SMALLINT NOT NULL, version BIGINT NOT NULL, point JSON NOT NULL,
    PRIMARY KEY (model, to_ms, device, seq, slot));
CREATE INDEX IF NOT EXISTS telemetry_by_time ON telemetry (to_ms);
CREATE INDEX IF NOT EXISTS model_telemetry_by_time ON model_telemetry (to_ms);
CREATE TABLE IF NOT EXISTS alerts (id BIGINT PRIMARY KEY, alert JSON NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    device TEXT NOT NULL, id BIGINT NOT NULL, model TEXT NOT NULL, version BIGINT NOT NULL,
    at_ms BIGINT NOT NULL, stored JSON NOT NULL,
    PRIMARY KEY (device, id));
CREATE INDEX IF NOT EXISTS samples_by_model ON samples (model, at_ms);
";

/// The PostgreSQL store: a pool of connections to one database.
pub struct PgStore {
    pool: Pool,
}

/// A pool failure as a store error (the pool wraps the driver's own).
fn pool_err(e: deadpool_postgres::PoolError) -> DbError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => DbError::Postgres(e),
        other => DbError::Pool(other.to_string()),
    }
}

/// A `u64` as PostgreSQL's `BIGINT` (ids and versions stay far below 2⁶³).
fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl PgStore {
    /// Connects to `url` (e.g. `postgres://modelcast@127.0.0.1/modelcast`) and creates the
    /// schema if it is missing.
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        let config: tokio_postgres::Config = url.parse()?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .build()
            .map_err(|e| DbError::Pool(e.to_string()))?;
        let store = PgStore { pool };
        let client = store.client().await?;
        // Two replicas starting at once must not both create the schema: the statements run
        // as one transaction, which holds the lock until it has committed.
        client
            .batch_execute(&format!("SELECT pg_advisory_xact_lock(7426); {SCHEMA}"))
            .await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, DbError> {
        self.pool.get().await.map_err(pool_err)
    }

    /// Runs a query for at most one JSON record (selected as text) and decodes it.
    async fn one<T: for<'de> serde::Deserialize<'de>>(
        &self,
        key: &str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<T>, DbError> {
        let row = self.client().await?.query_opt(sql, params).await?;
        row.map(|r| decode(key, r.try_get::<_, &str>(0)?.as_bytes()))
            .transpose()
    }

    /// Runs a query for JSON records (selected as text) and decodes them.
    async fn all<T: for<'de> serde::Deserialize<'de>>(
        &self,
        key: &str,
        sql: &str,
    ) -> Result<Vec<T>, DbError> {
        let rows = self.client().await?.query(sql, &[]).await?;
        rows.iter()
            .map(|r| decode(key, r.try_get::<_, &str>(0)?.as_bytes()))
            .collect()
    }

    /// Runs one statement.
    async fn exec(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<(), DbError> {
        self.client().await?.execute(sql, params).await?;
        Ok(())
    }
}

/// A record as the text of a `json` parameter.
fn json<T: serde::Serialize>(value: &T) -> String {
    String::from_utf8(encode(value)).expect("JSON is UTF-8")
}

#[async_trait::async_trait]
impl Storage for PgStore {
    async fn flush(&self) -> Result<(), DbError> {
        Ok(())
    }

    async fn put_chunk(&self, artifact: &[u8; 32], index: u32, data: &[u8]) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO chunks (digest, idx, data) VALUES ($1, $2, $3)
             ON CONFLICT (digest, idx) DO UPDATE SET data = EXCLUDED.data",
            &[&&artifact[..], &(index as i32), &data],
        )
        .await
    }

    async fn put_artifact(&self, artifact: &[u8; 32], info: &ArtifactInfo) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO artifacts (digest, info) VALUES ($1, $2::text::json)
             ON CONFLICT (digest) DO UPDATE SET info = EXCLUDED.info",
            &[&&artifact[..], &json(info)],
        )
        .await
    }

    async fn remove_artifact(&self, artifact: &[u8; 32]) -> Result<(), DbError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("DELETE FROM chunks WHERE digest = $1", &[&&artifact[..]])
            .await?;
        tx.execute("DELETE FROM artifacts WHERE digest = $1", &[&&artifact[..]])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn artifact(&self, artifact: &[u8; 32]) -> Result<Option<ArtifactInfo>, DbError> {
        self.one(
            &format!("artifacts/{}", hex::encode(artifact)),
            "SELECT info::text FROM artifacts WHERE digest = $1",
            &[&&artifact[..]],
        )
        .await
    }

    async fn chunk(&self, artifact: &[u8; 32], index: u32) -> Result<Option<Bytes>, DbError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT data FROM chunks WHERE digest = $1 AND idx = $2",
                &[&&artifact[..], &(index as i32)],
            )
            .await?;
        row.map(|r| Ok(Bytes::copy_from_slice(r.try_get::<_, &[u8]>(0)?)))
            .transpose()
    }

    async fn put_model(&self, entry: &ModelEntry) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO models (name, version, entry) VALUES ($1, $2, $3::text::json)
             ON CONFLICT (name, version) DO UPDATE SET entry = EXCLUDED.entry",
            &[
                &entry.manifest.name,
                &big(entry.manifest.version),
                &json(entry),
            ],
        )
        .await
    }

    async fn model(&self, name: &str, version: u64) -> Result<Option<ModelEntry>, DbError> {
        self.one(
            &format!("models/{name}/{version}"),
            "SELECT entry::text FROM models WHERE name = $1 AND version = $2",
            &[&name, &big(version)],
        )
        .await
    }

    async fn models(&self) -> Result<Vec<ModelEntry>, DbError> {
        self.all(
            "models",
            "SELECT entry::text FROM models ORDER BY name COLLATE \"C\", version",
        )
        .await
    }

    async fn repo_doc(&self, role: &str) -> Result<Option<Signed>, DbError> {
        self.one(
            &format!("repo/{role}"),
            "SELECT doc::text FROM repo WHERE role = $1",
            &[&role],
        )
        .await
    }

    async fn put_repo_doc(&self, role: &str, doc: &Signed) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO repo (role, doc) VALUES ($1, $2::text::json)
             ON CONFLICT (role) DO UPDATE SET doc = EXCLUDED.doc",
            &[&role, &json(doc)],
        )
        .await
    }

    async fn device(&self, id: &str) -> Result<Option<DeviceEntry>, DbError> {
        self.one(
            &format!("devices/{id}"),
            "SELECT entry::text FROM devices WHERE id = $1",
            &[&id],
        )
        .await
    }

    async fn enrolment(&self, id: &str) -> Result<Option<Enrolment>, DbError> {
        self.one(
            &format!("enrolments/{id}"),
            "SELECT entry::text FROM enrolments WHERE id = $1",
            &[&id],
        )
        .await
    }

    async fn enrolments(&self) -> Result<Vec<Enrolment>, DbError> {
        self.all(
            "enrolments",
            "SELECT entry::text FROM enrolments ORDER BY id COLLATE \"C\"",
        )
        .await
    }

    async fn put_enrolment(&self, entry: &Enrolment) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO enrolments (id, entry) VALUES ($1, $2::text::json)
             ON CONFLICT (id) DO UPDATE SET entry = EXCLUDED.entry",
            &[&entry.device, &json(entry)],
        )
        .await
    }

    async fn devices(&self) -> Result<Vec<DeviceEntry>, DbError> {
        self.all(
            "devices",
            "SELECT entry::text FROM devices ORDER BY id COLLATE \"C\"",
        )
        .await
    }

    async fn put_device(&self, entry: &DeviceEntry) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO devices (id, entry) VALUES ($1, $2::text::json)
             ON CONFLICT (id) DO UPDATE SET entry = EXCLUDED.entry",
            &[&entry.id, &json(entry)],
        )
        .await
    }

    async fn add_deployment(&self, mut d: Deployment) -> Result<Deployment, DbError> {
        d.seq = self.next_id().await?;
        self.exec(
            "INSERT INTO deployments (seq, entry) VALUES ($1, $2::text::json)",
            &[&big(d.seq), &json(&d)],
        )
        .await?;
        Ok(d)
    }

    async fn next_id(&self) -> Result<u64, DbError> {
        let row = self
            .client()
            .await?
            .query_one("SELECT nextval('ids')", &[])
            .await?;
        Ok(row.try_get::<_, i64>(0)? as u64)
    }

    async fn put_rollout(&self, rollout: &Rollout) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO rollouts (id, rollout) VALUES ($1, $2::text::json)
             ON CONFLICT (id) DO UPDATE SET rollout = EXCLUDED.rollout",
            &[&big(rollout.id), &json(rollout)],
        )
        .await
    }

    async fn rollouts(&self) -> Result<Vec<Rollout>, DbError> {
        self.all("rollouts", "SELECT rollout::text FROM rollouts ORDER BY id")
            .await
    }

    async fn append_audit(
        &self,
        who: &str,
        action: &str,
        details: serde_json::Value,
        at: i64,
    ) -> Result<AuditEntry, DbError> {
        let client = self.client().await?;
        for _ in 0..AUDIT_ATTEMPTS {
            let head = client
                .query_opt(
                    "SELECT seq, digest FROM audit ORDER BY seq DESC LIMIT 1",
                    &[],
                )
                .await?;
            let head = match head {
                Some(r) => Some((r.try_get::<_, i64>(0)? as u64, r.try_get::<_, String>(1)?)),
                None => None,
            };
            let entry = AuditEntry::following(head, who, action, &details, at);
            let inserted = client
                .execute(
                    "INSERT INTO audit (seq, entry, digest) VALUES ($1, $2::text::json, $3)",
                    &[&big(entry.seq), &json(&entry), &entry.digest()],
                )
                .await;
            match inserted {
                Ok(_) => return Ok(entry),
                // Another replica took this position first: link to its entry instead.
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(DbError::Pool(format!(
            "audit log: lost the race for a position {AUDIT_ATTEMPTS} times"
        )))
    }

    async fn audit(&self, since: u64) -> Result<Vec<AuditEntry>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT entry::text FROM audit WHERE seq >= $1 ORDER BY seq",
                &[&big(since.max(1))],
            )
            .await?;
        rows.iter()
            .map(|r| decode("audit", r.try_get::<_, &str>(0)?.as_bytes()))
            .collect()
    }

    async fn deployments(&self) -> Result<Vec<Deployment>, DbError> {
        self.all(
            "deployments",
            "SELECT entry::text FROM deployments ORDER BY seq",
        )
        .await
    }

    async fn director(&self, device: &str) -> Result<DirectorEntry, DbError> {
        Ok(self
            .one(
                &format!("director/{device}"),
                "SELECT entry::text FROM director WHERE device = $1",
                &[&device],
            )
            .await?
            .unwrap_or_default())
    }

    async fn put_director(&self, device: &str, entry: &DirectorEntry) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO director (device, entry) VALUES ($1, $2::text::json)
             ON CONFLICT (device) DO UPDATE SET entry = EXCLUDED.entry",
            &[&device, &json(entry)],
        )
        .await
    }

    async fn add_telemetry(&self, report: &TelemetryReport) -> Result<bool, DbError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let added = tx
            .execute(
                "INSERT INTO telemetry (device, to_ms, seq, report) VALUES ($1, $2, $3, $4::text::json)
                 ON CONFLICT DO NOTHING",
                &[&report.device, &report.to_ms, &big(report.seq), &json(report)],
            )
            .await?;
        if added == 0 {
            return Ok(false);
        }
        for p in ModelInterval::of(report) {
            tx.execute(
                "INSERT INTO model_telemetry (model, to_ms, device, seq, slot, version, point)
                 VALUES ($1, $2, $3, $4, $5, $6, $7::text::json) ON CONFLICT DO NOTHING",
                &[
                    &p.telemetry.model,
                    &p.to_ms,
                    &p.device,
                    &big(p.seq),
                    &(p.telemetry.slot as i16),
                    &big(p.telemetry.version),
                    &json(&p),
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn model_telemetry(
        &self,
        model: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<ModelInterval>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT point::text FROM model_telemetry
                 WHERE model = $1 AND to_ms BETWEEN $2 AND $3
                 ORDER BY to_ms, device COLLATE \"C\", seq, slot",
                &[&model, &from_ms, &to_ms],
            )
            .await?;
        rows.iter()
            .map(|r| decode("model_telemetry", r.try_get::<_, &str>(0)?.as_bytes()))
            .collect()
    }

    async fn device_telemetry(
        &self,
        device: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<TelemetryReport>, DbError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT report::text FROM telemetry
                 WHERE device = $1 AND to_ms BETWEEN $2 AND $3
                 ORDER BY to_ms DESC, seq DESC LIMIT $4",
                &[&device, &from_ms, &to_ms, &big(limit as u64)],
            )
            .await?;
        // Newest first from the query; oldest first to the caller.
        rows.iter()
            .rev()
            .map(|r| decode("telemetry", r.try_get::<_, &str>(0)?.as_bytes()))
            .collect()
    }

    async fn prune_telemetry(&self, before_ms: i64) -> Result<u64, DbError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let removed = tx
            .execute("DELETE FROM telemetry WHERE to_ms < $1", &[&before_ms])
            .await?;
        tx.execute(
            "DELETE FROM model_telemetry WHERE to_ms < $1",
            &[&before_ms],
        )
        .await?;
        tx.execute("DELETE FROM samples WHERE at_ms < $1", &[&before_ms])
            .await?;
        tx.execute(
            "DELETE FROM alerts WHERE (alert->>'cleared_ms')::BIGINT < $1",
            &[&before_ms],
        )
        .await?;
        tx.commit().await?;
        Ok(removed)
    }

    async fn add_samples(
        &self,
        device: &str,
        received_ms: i64,
        samples: &[Sample],
    ) -> Result<u64, DbError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut added = 0;
        for sample in samples {
            let stored = StoredSample::new(device, received_ms, sample);
            added += tx
                .execute(
                    "INSERT INTO samples (device, id, model, version, at_ms, stored)
                     VALUES ($1, $2, $3, $4, $5, $6::text::json) ON CONFLICT DO NOTHING",
                    &[
                        &device,
                        &big(sample.id),
                        &sample.model,
                        &big(sample.version),
                        &sample.at_ms,
                        &json(&stored),
                    ],
                )
                .await?;
        }
        tx.commit().await?;
        Ok(added)
    }

    async fn samples(&self, query: &SampleQuery) -> Result<Vec<StoredSample>, DbError> {
        let version = query.version.map(big);
        let rows = self
            .client()
            .await?
            .query(
                "SELECT stored FROM (
                     SELECT stored::text, at_ms, device, id,
                            SUM(octet_length(stored::text)) OVER (
                                ORDER BY at_ms DESC, device COLLATE \"C\" DESC, id DESC
                            ) - octet_length(stored::text) AS before
                     FROM samples
                     WHERE model = $1 AND at_ms BETWEEN $2 AND $3
                       AND ($4::BIGINT IS NULL OR version = $4)
                       AND ($5::TEXT IS NULL OR device = $5)
                 ) newest
                 WHERE before < $7
                 ORDER BY at_ms DESC, device COLLATE \"C\" DESC, id DESC LIMIT $6",
                &[
                    &query.model,
                    &query.from_ms,
                    &query.to_ms,
                    &version,
                    &query.device,
                    &big(query.limit as u64),
                    &big(query.max_bytes as u64),
                ],
            )
            .await?;
        // Newest first from the query; oldest first to the caller.
        rows.iter()
            .rev()
            .map(|r| decode("samples", r.try_get::<_, &str>(0)?.as_bytes()))
            .collect()
    }

    async fn put_alert(&self, alert: &Alert) -> Result<(), DbError> {
        self.exec(
            "INSERT INTO alerts (id, alert) VALUES ($1, $2::text::json)
             ON CONFLICT (id) DO UPDATE SET alert = EXCLUDED.alert",
            &[&big(alert.id), &json(alert)],
        )
        .await
    }

    async fn alerts(&self) -> Result<Vec<Alert>, DbError> {
        self.all("alerts", "SELECT alert::text FROM alerts ORDER BY id")
            .await
    }
}
