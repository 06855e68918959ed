//! Desired states: which version of each model a device should run (the latest of the
//! deployments whose group selects it and the rollouts that moved it), signed and published
//! retained when it changes; the repository's timestamp refreshed before it expires.

use std::collections::BTreeMap;

use modelcast_proto::desired::TargetTerms;
use modelcast_proto::engine::choose_form;
use modelcast_proto::manifest::Manifest;
use modelcast_proto::topic::DeviceTopic;
use rumqttc::QoS;
use tracing::{info, warn};

use crate::db::{DbError, Deployment, DeviceEntry, DirectorEntry};
use crate::group::Selector;
use crate::repo::{RepoError, ONLINE_LIFETIME_SECS};
use crate::rollout::Rollout;
use crate::unix_now;

use super::Fleet;

/// A version a device should run, with its deployment's terms (probation, sampling,
/// download policy, backend) and the form of it the device downloads (`terms.form`).
pub type Wanted = (Manifest, TargetTerms);

/// What the device downloads of a wanted version: the form its terms name (the manifest's own
/// artifact when they name none).
pub fn download_of((manifest, terms): &Wanted) -> std::borrow::Cow<'_, Manifest> {
    match terms.form.and_then(|f| manifest.in_form(f)) {
        Some(view) => std::borrow::Cow::Owned(view),
        None => std::borrow::Cow::Borrowed(manifest),
    }
}

/// One version of a model offered to a device by a deployment or a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The deployment's sequence number or the rollout's id (one counter): the highest wins.
    pub seq: u64,
    /// The version offered.
    pub version: u64,
    /// Its probation, sampling and download policy.
    pub terms: TargetTerms,
}

/// Which version of each model the device `id` with `labels` should run: per model, the
/// offer with the highest `seq` of the deployments whose group selects the device (a group
/// that does not parse selects nothing) and the rollouts that assign it a version; at equal
/// `seq`, a rollout over a deployment, a later one over an earlier. Pure: the fleet's
/// [`Fleet::wanted`] reads the inputs and looks the manifests up.
pub fn resolve<'a>(
    id: &str,
    labels: &BTreeMap<String, String>,
    deployments: &[Deployment],
    rollouts: impl IntoIterator<Item = &'a Rollout>,
) -> BTreeMap<String, Offer> {
    let mut per_model: BTreeMap<String, Offer> = BTreeMap::new();
    let mut offer = |model: &str, offer: Offer| match per_model.get(model) {
        Some(held) if offer.seq < held.seq => {}
        _ => {
            per_model.insert(model.to_string(), offer);
        }
    };
    for d in deployments {
        if Selector::parse(&d.group).is_ok_and(|s| s.matches(labels)) {
            let terms = TargetTerms {
                probation: d.probation,
                sampling: d.sampling,
                download: d.download.clone(),
                backend: d.backend,
                shadow: d.shadow,
                canary: d.canary.clone(),
                form: None,
                key_wrap: None,
            };
            offer(
                &d.model,
                Offer {
                    seq: d.seq,
                    version: d.version,
                    terms,
                },
            );
        }
    }
    for r in rollouts {
        if let Some((version, terms)) = r.assignment(id) {
            offer(
                &r.spec.model,
                Offer {
                    seq: r.id,
                    version,
                    terms,
                },
            );
        }
    }
    per_model
}

/// What a desired state says, as compared with the last one published: the target paths
/// of `models` with their terms, sorted, and the repository's timestamp version `ts`. A
/// device's desired state is published again only when this changes.
pub fn fingerprint(models: &[Wanted], ts: u64) -> String {
    let mut paths: Vec<String> = models
        .iter()
        .map(|(m, t)| {
            let mut path = m.target_path();
            if let Some(p) = t.probation {
                path.push_str(&serde_json::json!(p).to_string());
            }
            if let Some(s) = t.sampling {
                path.push_str(&format!("sampling{}", serde_json::json!(s)));
            }
            if let Some(d) = &t.download {
                path.push_str(&format!("download{}", serde_json::json!(d)));
            }
            if let Some(b) = t.backend {
                path.push_str(&format!("backend={b}"));
            }
            if let Some(f) = t.form {
                path.push_str(&format!("form={f}"));
            }
            if let Some(s) = t.shadow {
                path.push_str(&format!("shadow{}", serde_json::json!(s)));
            }
            if let Some(c) = &t.canary {
                path.push_str(&format!("canary{}", serde_json::json!(c)));
            }
            if let Some(w) = &t.key_wrap {
                path.push_str(&format!("key_wrap={}", w.enc));
            }
            path
        })
        .collect();
    paths.sort();
    format!("{}@{ts}", paths.join(","))
}

impl Fleet {
    /// The manifests `device` should run, each with its terms (`desired::resolve`) and the
    /// form it downloads: the one its last report prefers under the terms' backend
    /// ([`choose_form`]).
    pub async fn wanted(&self, device: &DeviceEntry) -> Result<Vec<Wanted>, DbError> {
        let deployments = self.db.deployments().await?;
        let chosen = {
            let rollouts = self.rollouts.lock().expect("rollouts lock");
            resolve(&device.id, &device.labels, &deployments, rollouts.values())
        };
        let mut out = Vec::new();
        let engines = device.report.as_ref().and_then(|r| r.engines.as_ref());
        // A device cut off (quarantined, or its certificate revoked) is wrapped no key.
        let sealing_key = match device.quarantine {
            Some(_) => None,
            None => device
                .report
                .as_ref()
                .and_then(|r| r.sealing_key.as_deref()),
        };
        for (name, mut offer) in chosen {
            if let Some(entry) = self.db.model(&name, offer.version).await? {
                offer.terms.form = choose_form(&entry.manifest, engines, offer.terms.backend);
                // An encrypted version's content key, sealed to this device (none for a
                // device that has not reported its key: it refuses the version, and is
                // sent the key once it reports one).
                if let (Some(escrow), Some(key)) = (&entry.key_escrow, sealing_key) {
                    match self
                        .repo
                        .wrap_for(escrow, &entry.manifest.sha256, &device.id, key)
                    {
                        Ok(wrap) => offer.terms.key_wrap = Some(wrap),
                        Err(e) => {
                            warn!(device = %device.id, error = %e, "no key wrap for the device")
                        }
                    }
                }
                out.push((entry.manifest, offer.terms));
            }
        }
        Ok(out)
    }

    /// Publishes `device`'s desired state if it changed since the last publication.
    pub async fn publish_desired(&self, device: &str) -> Result<bool, RepoError> {
        let _guard = self.publishing.lock().await;
        let Some(entry) = self.db.device(device).await? else {
            return Ok(false);
        };
        let models = self.wanted(&entry).await?;
        if models.is_empty() {
            return Ok(false);
        }
        let ts = self.repo.timestamp().await?.map_or(0, |t| t.version);
        let content = fingerprint(&models, ts);
        let last = self.db.director(device).await?;
        if last.content == content {
            return Ok(false);
        }
        let version = last.version + 1;
        let desired = self
            .repo
            .desired(device, &models, version, unix_now())
            .await?;
        let topic = self.topics.device(device, DeviceTopic::Desired);
        self.client
            .publish(topic, QoS::AtLeastOnce, true, desired.to_vec())
            .await
            .map_err(|e| RepoError::Rejected(format!("publishing: {e}")))?;
        info!(%device, version, models = %content, "desired state published");
        self.expect_downloads(&entry, &models);
        self.db
            .put_director(device, &DirectorEntry { version, content })
            .await?;
        Ok(true)
    }

    /// Tells the fan-out which artifacts of a desired state just published `device` is to
    /// download: those neither of its slots holds by its last report.
    fn expect_downloads(&self, device: &DeviceEntry, models: &[Wanted]) {
        let Some(fanout) = &self.fanout else {
            return;
        };
        let held = |sha256: &str| {
            device.report.as_ref().is_some_and(|r| {
                r.models.values().any(|m| {
                    [&m.a, &m.b]
                        .into_iter()
                        .flatten()
                        .any(|c| c.sha256.eq_ignore_ascii_case(sha256))
                })
            })
        };
        let now = std::time::Instant::now();
        let mut fanout = fanout.lock().expect("fanout lock");
        for (m, terms) in models {
            match m.sha256_in(terms.form) {
                Some(sha256) if !held(sha256) => fanout.expect(now, sha256, &device.id),
                _ => {}
            }
        }
    }

    /// Re-evaluates every device (after a deployment or a repository change).
    pub async fn publish_all(&self) -> Result<usize, RepoError> {
        let mut changed = 0;
        for d in self.db.devices().await? {
            if self.publish_desired(&d.id).await? {
                changed += 1;
            }
        }
        Ok(changed)
    }

    pub(super) async fn refresh_if_due(&self) -> Result<(), RepoError> {
        let Some(ts) = self.repo.timestamp().await? else {
            return Ok(());
        };
        let expires = modelcast_proto::metadata::parse_expiry(&ts.expires).unwrap_or(0);
        if expires - unix_now() < ONLINE_LIFETIME_SECS / 2 {
            self.repo.refresh(unix_now()).await?;
            self.publish_all().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::RolloutSpec;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn deployment(seq: u64, model: &str, version: u64, group: &str) -> Deployment {
        Deployment {
            seq,
            model: model.into(),
            version,
            group: group.into(),
            by: "ops".into(),
            at: 0,
            probation: None,
            sampling: None,
            download: None,
            backend: None,
            shadow: None,
            canary: None,
        }
    }

    /// A rollout `id` of `model` v`version` whose canary (the first wave, one device) is
    /// `device`, so it is assigned the version at once.
    fn rollout(id: u64, model: &str, version: u64, device: &str, before: u64) -> Rollout {
        let spec = RolloutSpec::new(model, version, "*", &["1"]).unwrap();
        Rollout::start(id, spec, "ops", 0, vec![(device.into(), Some(before))]).0
    }

    fn versions(chosen: &BTreeMap<String, Offer>) -> Vec<(&str, u64)> {
        chosen
            .iter()
            .map(|(m, o)| (m.as_str(), o.version))
            .collect()
    }

    #[test]
    fn the_latest_deployment_that_selects_the_device_wins_per_model() {
        let lab = labels(&[("site", "lab")]);
        let deployments = [
            deployment(1, "classifier", 1, "site=lab"),
            deployment(2, "detector", 4, "*"),
            deployment(3, "classifier", 2, "site=lab"),
            // Not this device's group, a group that does not parse: neither counts.
            deployment(4, "classifier", 9, "site=field"),
            deployment(5, "classifier", 8, "site=="),
        ];
        let chosen = resolve("edge-1", &lab, &deployments, []);
        assert_eq!(versions(&chosen), [("classifier", 2), ("detector", 4)]);
        assert!(resolve("edge-2", &labels(&[]), &deployments[..1], []).is_empty());
    }

    #[test]
    fn a_rollout_overrides_older_deployments_and_a_newer_deployment_overrides_it() {
        let lab = labels(&[("site", "lab")]);
        let moved = rollout(5, "classifier", 3, "edge-1", 2);
        let older = [deployment(1, "classifier", 2, "site=lab")];
        let chosen = resolve("edge-1", &lab, &older, [&moved]);
        assert_eq!(versions(&chosen), [("classifier", 3)]);
        // Another device of the group is not a member: the deployment holds.
        let other = resolve("edge-2", &lab, &older, [&moved]);
        assert_eq!(versions(&other), [("classifier", 2)]);
        let newer = [older[0].clone(), deployment(6, "classifier", 4, "*")];
        let chosen = resolve("edge-1", &lab, &newer, [&moved]);
        assert_eq!(versions(&chosen), [("classifier", 4)]);
    }

    #[test]
    fn the_fingerprint_changes_with_the_versions_and_the_timestamp() {
        let m = |version: u64| Manifest {
            format: 1,
            name: "classifier".into(),
            version,
            model_format: modelcast_proto::manifest::ModelFormat::Onnx,
            size: 0,
            sha256: String::new(),
            chunk_size: 4,
            segments: vec![],
            chunks: vec![],
            inputs: vec![],
            outputs: vec![],
            golden_file: None,
            golden: vec![],
            expires: "2030-01-01T00:00:00Z".into(),
            metadata: Default::default(),
            probation: None,
            latency_budget: None,
            memory_bytes: None,
            fallback_to: None,
            forms: Vec::new(),
            encryption: None,
            tolerance: Default::default(),
        };
        let none = TargetTerms::default;
        let a = fingerprint(&[(m(1), none())], 7);
        assert_eq!(a, fingerprint(&[(m(1), none())], 7));
        assert_ne!(a, fingerprint(&[(m(2), none())], 7));
        assert_ne!(a, fingerprint(&[(m(1), none())], 8));
        // A new download policy is a new desired state.
        let windowed = TargetTerms {
            download: Some(modelcast_proto::desired::DownloadPolicy {
                window: modelcast_proto::window::MaintenanceWindow::parse("02:00-03:00").ok(),
                ..Default::default()
            }),
            ..TargetTerms::default()
        };
        assert_ne!(a, fingerprint(&[(m(1), windowed)], 7));
        // So are a new shadow phase and a new traffic split.
        let shadowed = TargetTerms {
            shadow: Some(modelcast_proto::desired::ShadowSpec::new(100)),
            ..TargetTerms::default()
        };
        assert_ne!(a, fingerprint(&[(m(1), shadowed)], 7));
        let split = |percent| TargetTerms {
            canary: Some(modelcast_proto::desired::CanarySpec { percent, key: None }),
            ..TargetTerms::default()
        };
        let ten = fingerprint(&[(m(1), split(10))], 7);
        assert_ne!(a, ten);
        assert_ne!(ten, fingerprint(&[(m(1), split(50))], 7));
    }

    fn arb_deployment() -> impl Strategy<Value = Deployment> {
        (
            0u64..40,
            prop::sample::select(vec!["a", "b", "c"]),
            1u64..6,
            prop::sample::select(vec!["*", "site=lab", "site=field", "tier=gold", "site=="]),
        )
            .prop_map(|(seq, model, version, group)| deployment(seq, model, version, group))
    }

    proptest! {
        /// Per model, the chosen version is that of the highest-sequence deployment that
        /// selects the device (the last of equals), and no model is chosen that none offers.
        #[test]
        fn the_choice_is_the_highest_applicable_offer(
            deployments in prop::collection::vec(arb_deployment(), 0..24),
            gold in any::<bool>(),
        ) {
            let mut pairs = vec![("site", "lab")];
            if gold {
                pairs.push(("tier", "gold"));
            }
            let lab = labels(&pairs);
            let chosen = resolve("edge-1", &lab, &deployments, []);
            let applies = |d: &Deployment| {
                Selector::parse(&d.group).is_ok_and(|s| s.matches(&lab))
            };
            for model in ["a", "b", "c"] {
                let best = deployments
                    .iter()
                    .filter(|d| d.model == model && applies(d))
                    .fold(None::<&Deployment>, |best, d| match best {
                        Some(b) if b.seq > d.seq => Some(b),
                        _ => Some(d),
                    });
                prop_assert_eq!(chosen.get(model).map(|o| o.version), best.map(|d| d.version));
            }
        }

        /// With distinct sequence numbers, the order deployments are read in does not matter,
        /// and a deployment to a group that does not select the device changes nothing.
        #[test]
        fn the_choice_depends_on_neither_order_nor_other_groups(
            deployments in prop::collection::vec(arb_deployment(), 0..16),
            extra in arb_deployment(),
        ) {
            let mut distinct: Vec<Deployment> = deployments
                .into_iter()
                .enumerate()
                .map(|(i, mut d)| { d.seq = i as u64 * 2; d })
                .collect();
            let lab = labels(&[("site", "lab")]);
            let chosen = resolve("edge-1", &lab, &distinct, []);
            distinct.reverse();
            prop_assert_eq!(&resolve("edge-1", &lab, &distinct, []), &chosen);
            let mut other = extra;
            other.group = "site=field".into();
            distinct.push(other);
            prop_assert_eq!(&resolve("edge-1", &lab, &distinct, []), &chosen);
        }
    }
}
