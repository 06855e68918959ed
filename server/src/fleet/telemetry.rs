//! Telemetry intake: a device's reports are admitted by its budget, decoded, stored once
//! (with the samples its deployment asks for), acknowledged, and fed to drift detection
//! ([`super::alerts`]); old telemetry is pruned past its retention.

use modelcast_proto::telemetry::{Sample, TelemetryAck, TelemetryReport};
use modelcast_proto::topic::DeviceTopic;
use rumqttc::QoS;
use tracing::{debug, info, warn};

use crate::db::{DbError, ModelInterval};
use crate::drift::Change;
use crate::unix_now;

use super::{Fleet, Rejected};

/// A drift stream without a point for this long is forgotten.
const DRIFT_IDLE_MS: i64 = 24 * 3600 * 1000;
/// Reports whose interval ends further in the future than this are refused (a device's
/// clock gone wrong would otherwise keep them past every retention).
const MAX_CLOCK_AHEAD_MS: i64 = 24 * 3600 * 1000;

/// Why a decoded telemetry report was not taken.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refused {
    /// The device's clock is ahead: refused for good (and acknowledged, so it is not sent
    /// again).
    #[error("telemetry #{seq} ends {ahead_ms} ms in the future: the device's clock is wrong")]
    ClockAhead {
        /// The report.
        seq: u64,
        /// How far ahead.
        ahead_ms: i64,
    },
    /// The database failed: the report is not acknowledged, so the device sends it again.
    #[error(transparent)]
    Storage(#[from] DbError),
}

impl Fleet {
    /// Removes telemetry older than the retention.
    pub(super) async fn prune_telemetry(&self) {
        let keep = self.telemetry_retention_secs;
        let before = unix_now()
            .saturating_sub(i64::try_from(keep).unwrap_or(i64::MAX))
            .saturating_mul(1000);
        match self.db.prune_telemetry(before).await {
            Ok(0) => {}
            Ok(n) => info!(reports = n, "removed telemetry past its retention"),
            Err(e) => warn!(error = %e, "pruning telemetry failed"),
        }
        let idle = crate::unix_now_ms() - DRIFT_IDLE_MS;
        let forgotten = self.drift.lock().expect("drift lock").forget_idle(idle);
        if forgotten > 0 {
            info!(streams = forgotten, "forgot idle drift streams");
        }
    }

    /// Stores a device's telemetry report (the first copy of each), and the samples it
    /// carries.
    pub(super) async fn handle_telemetry(
        &self,
        device: &str,
        payload: &[u8],
    ) -> Result<(), Rejected> {
        use std::sync::atomic::Ordering::Relaxed;
        let admitted = self.telemetry_budgets.lock().expect("budgets lock").admit(
            device,
            payload.len() as u64,
            std::time::Instant::now(),
        );
        if !admitted {
            // Dropped unread; counted, and logged at most once per report it concerns.
            self.telemetry_over_budget.fetch_add(1, Relaxed);
            self.drops.add(device, "telemetry_over_budget", 1);
            debug!(%device, bytes = payload.len(), "telemetry over the device's budget dropped");
            return Ok(());
        }
        let report = match TelemetryReport::from_slice(payload) {
            Ok(r) if r.device == device => r,
            Ok(r) => {
                self.telemetry_rejected.fetch_add(1, Relaxed);
                return Err(Rejected::WrongDevice {
                    kind: "telemetry",
                    named: r.device,
                });
            }
            Err(e) => {
                self.telemetry_rejected.fetch_add(1, Relaxed);
                return Err(Rejected::Decode(e));
            }
        };
        if let Err(e) = self.seen(device).await {
            debug!(%device, error = %e, "last seen not recorded");
        }
        let seq = report.seq;
        let taken = self.take_telemetry(device, report).await;
        // The receipt: the device drops the report from its queue. Not when storing failed
        // (it sends the report again later).
        if !matches!(taken, Err(Refused::Storage(_))) {
            let ack = TelemetryAck::new(device, vec![seq]).to_vec();
            let topic = self.topics.device(device, DeviceTopic::TelemetryAcks);
            if let Err(e) = self
                .client
                .publish(topic, QoS::AtLeastOnce, false, ack)
                .await
            {
                debug!(%device, seq, error = %e, "telemetry receipt not sent");
            }
        }
        Ok(taken?)
    }

    /// Stores one decoded report of `device` and feeds drift detection.
    async fn take_telemetry(
        &self,
        device: &str,
        mut report: TelemetryReport,
    ) -> Result<(), Refused> {
        use std::sync::atomic::Ordering::Relaxed;
        if report.to_ms > crate::unix_now_ms().saturating_add(MAX_CLOCK_AHEAD_MS) {
            self.telemetry_rejected.fetch_add(1, Relaxed);
            return Err(Refused::ClockAhead {
                seq: report.seq,
                ahead_ms: report.to_ms - crate::unix_now_ms(),
            });
        }
        // Samples are kept apart from the time series; a re-sent report's samples are stored
        // again (each is kept once), in case the first copy's were not.
        let samples = std::mem::take(&mut report.samples);
        if !samples.is_empty() {
            self.store_samples(device, samples)
                .await
                .map_err(Refused::Storage)?;
        }
        if !self
            .db
            .add_telemetry(&report)
            .await
            .map_err(Refused::Storage)?
        {
            self.telemetry_duplicates.fetch_add(1, Relaxed);
            return Ok(());
        }
        debug!(%device, seq = report.seq, "telemetry stored");
        self.telemetry_stored.fetch_add(1, Relaxed);
        let changes: Vec<Change> = {
            let mut drift = self.drift.lock().expect("drift lock");
            ModelInterval::of(&report)
                .iter()
                .flat_map(|p| drift.observe(p))
                .collect()
        };
        self.apply_drift(changes).await;
        Ok(())
    }

    /// Stores the samples of models that `device`'s deployments sample now; drops the rest (a
    /// device that samples unasked, or a deployment that stopped sampling).
    async fn store_samples(&self, device: &str, samples: Vec<Sample>) -> Result<(), DbError> {
        use std::sync::atomic::Ordering::Relaxed;
        let sampled: std::collections::BTreeSet<String> = match self.db.device(device).await? {
            Some(entry) => self
                .wanted(&entry)
                .await?
                .into_iter()
                .filter(|(_, terms)| terms.sampling.is_some())
                .map(|(m, _)| m.name)
                .collect(),
            None => Default::default(),
        };
        let (keep, refuse): (Vec<Sample>, Vec<Sample>) = samples
            .into_iter()
            .partition(|s| sampled.contains(&s.model));
        if !refuse.is_empty() {
            warn!(%device, samples = refuse.len(), "samples of a model not sampled; dropped");
            self.samples_refused.fetch_add(refuse.len() as u64, Relaxed);
        }
        let added = self
            .db
            .add_samples(device, crate::unix_now_ms(), &keep)
            .await?;
        self.samples_stored.fetch_add(added, Relaxed);
        Ok(())
    }
}
