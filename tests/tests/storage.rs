//! The server's storage interface, one contract for both stores: the embedded sled store and
//! PostgreSQL (Debian's server, started by the test on a free loopback port). Every record
//! round-trips unchanged (signed metadata byte for byte), lists come back in the order the
//! server relies on, ids only grow, and concurrent appends to the audit log, as two server
//! replicas would make, keep its hash chain whole.

use std::collections::BTreeMap;

use modelcast_proto::manifest::TensorData;
use modelcast_proto::metadata::Signed;
use modelcast_proto::report::Slot;
use modelcast_proto::telemetry::{LatencyBuckets, ModelTelemetry, Sample, TelemetryReport};
use modelcast_server::audit::verify_chain;
use modelcast_server::db::{
    self, ArtifactInfo, Db, Deployment, DeviceEntry, DirectorEntry, ModelEntry, SampleQuery, Stage,
    StoredSample,
};
use modelcast_server::rollout::{Rollout, RolloutSpec};
use modelcast_tests::Postgres;

fn model(name: &str, version: u64) -> ModelEntry {
    let manifest = modelcast_proto::manifest::Manifest {
        format: modelcast_proto::FORMAT_VERSION,
        name: name.into(),
        version,
        model_format: Default::default(),
        size: 3,
        sha256: "00".repeat(32),
        chunk_size: 1,
        segments: vec![],
        chunks: vec!["11".repeat(32); 3],
        inputs: Vec::new(),
        outputs: Vec::new(),
        golden: Vec::new(),
        golden_file: None,
        expires: "2030-01-01T00:00:00Z".into(),
        metadata: BTreeMap::from([(
            "training".into(),
            format!("{name} v{version}: naïve, \"quoted\", 1e300"),
        )]),
        probation: None,
        latency_budget: None,
        memory_bytes: None,
        fallback_to: Some(1),
        forms: Vec::new(),
        encryption: None,
        tolerance: Default::default(),
    };
    ModelEntry {
        manifest,
        published_by: "carol".into(),
        published_at: 1_700_000_000 + version as i64,
        stage: Stage::Candidate,
        staged_by: None,
        key_escrow: None,
    }
}

fn device(id: &str) -> DeviceEntry {
    DeviceEntry {
        id: id.into(),
        labels: BTreeMap::from([("site".into(), "lab".into())]),
        report: None,
        last_seen: 42,
        online: true,
        // Kept by both stores (a quarantine outlasts a restart).
        quarantine: Some(modelcast_server::db::Quarantine {
            by: "ops".into(),
            at: 7,
            reason: "floods".into(),
        }),
        dropped: Default::default(),
    }
}

/// Every method of the interface against `db`, which starts empty; `other` is a second
/// handle on the same store where the store can be shared (PostgreSQL), as a replica has.
async fn contract(db: Db, other: Option<Db>) {
    // Artifacts and chunks.
    let digest = [7u8; 32];
    assert_eq!(db.artifact(&digest).await.unwrap(), None);
    for i in 0..3u32 {
        db.put_chunk(&digest, i, &vec![i as u8; 1000 + i as usize])
            .await
            .unwrap();
    }
    let info = ArtifactInfo {
        size: 3003,
        chunk_size: 1001,
        segments: vec![1000, 1500],
    };
    db.put_artifact(&digest, &info).await.unwrap();
    assert_eq!(db.artifact(&digest).await.unwrap(), Some(info));
    assert_eq!(
        db.chunk(&digest, 2).await.unwrap().unwrap(),
        vec![2u8; 1002]
    );
    assert_eq!(db.chunk(&digest, 3).await.unwrap(), None);
    db.remove_artifact(&digest).await.unwrap();
    assert_eq!(db.artifact(&digest).await.unwrap(), None);
    assert_eq!(db.chunk(&digest, 0).await.unwrap(), None);

    // The registry, by name (bytewise) then version.
    for (name, version) in [("b", 2), ("a", 10), ("b", 1), ("a", 9), ("B", 1)] {
        db.put_model(&model(name, version)).await.unwrap();
    }
    let mut promoted = model("a", 9);
    promoted.stage = Stage::Production;
    promoted.staged_by = Some(("dave".into(), 7));
    db.put_model(&promoted).await.unwrap();
    assert_eq!(db.model("a", 9).await.unwrap(), Some(promoted));
    assert_eq!(db.model("a", 11).await.unwrap(), None);
    let order: Vec<(String, u64)> = db
        .models()
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.manifest.name, m.manifest.version))
        .collect();
    let want = [("B", 1), ("a", 9), ("a", 10), ("b", 1), ("b", 2)];
    assert_eq!(order, want.map(|(n, v)| (n.to_string(), v)));

    // Repository documents: the signed part exactly as it was.
    let key = modelcast_proto::keys::SigningKey::from_bytes(&[9; 32]);
    let doc = Signed::sign(
        &serde_json::json!({"_type": "targets", "version": 3, "z": 1, "a": [1, 25, "ü", "\\u0000"]}),
        &[&key],
    );
    db.put_repo_doc("targets", &doc).await.unwrap();
    let back = db.repo_doc("targets").await.unwrap().unwrap();
    assert_eq!(
        serde_json::to_vec(&back).unwrap(),
        serde_json::to_vec(&doc).unwrap()
    );
    assert_eq!(db.repo_doc("snapshot").await.unwrap(), None);

    // Devices, by id.
    for id in ["edge-2", "edge-10", "edge-1"] {
        db.put_device(&device(id)).await.unwrap();
    }
    let mut moved = device("edge-2");
    moved.online = false;
    db.put_device(&moved).await.unwrap();
    assert_eq!(db.device("edge-2").await.unwrap(), Some(moved));
    let ids: Vec<String> = db
        .devices()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, ["edge-1", "edge-10", "edge-2"]);

    // Enrolment records, by device id; a record replaced keeps one entry.
    use modelcast_server::enrol::{EnrolState, Enrolment, IssuedCert};
    let enrolment = |id: &str, state| Enrolment {
        device: id.into(),
        state,
        claim: Some("batch-1".into()),
        public_key: "ab".into(),
        sealing_key: None,
        labels: BTreeMap::from([("site".to_string(), "lab".to_string())]),
        csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
        requested_at: 5,
        decided: None,
        certificates: vec![],
        certificate: None,
    };
    assert_eq!(db.enrolment("edge-2").await.unwrap(), None);
    for id in ["edge-2", "edge-10"] {
        db.put_enrolment(&enrolment(id, EnrolState::Pending))
            .await
            .unwrap();
    }
    let mut enrolled = enrolment("edge-2", EnrolState::Pending);
    enrolled.issued(IssuedCert {
        serial: "7f01".into(),
        not_before: 1,
        not_after: 2,
    });
    db.put_enrolment(&enrolled).await.unwrap();
    assert_eq!(db.enrolment("edge-2").await.unwrap(), Some(enrolled));
    let ids: Vec<String> = db
        .enrolments()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.device)
        .collect();
    assert_eq!(ids, ["edge-10", "edge-2"]);

    // Ids grow; deployments come back in their order.
    let first = db.next_id().await.unwrap();
    let d1 = db
        .add_deployment(Deployment {
            seq: 0,
            model: "a".into(),
            version: 9,
            group: "*".into(),
            by: "carol".into(),
            at: 1,
            probation: None,
            sampling: Some(modelcast_proto::desired::SamplingSpec {
                rate_permille: 10,
                budget_bytes: 65_536,
            }),
            download: Some(modelcast_proto::desired::DownloadPolicy {
                max_rate: Some(1 << 20),
                window: modelcast_proto::window::MaintenanceWindow::parse("sat,sun 01:00-05:00")
                    .ok(),
                window_mode: modelcast_proto::desired::WindowMode::Download,
                utc_offset_minutes: Some(-330),
                metered: true,
                http: Some("http://127.0.0.1:1/files".into()),
            }),
            backend: Some(modelcast_proto::engine::Backend::Onnxruntime),
            shadow: Some(modelcast_proto::desired::ShadowSpec {
                max_mean_abs_diff_millionths: Some(50_000),
                ..modelcast_proto::desired::ShadowSpec::new(500)
            }),
            canary: Some(modelcast_proto::desired::CanarySpec {
                percent: 10,
                key: Some("x-user-id".into()),
            }),
        })
        .await
        .unwrap();
    let d2 = db
        .add_deployment(Deployment {
            version: 10,
            ..d1.clone()
        })
        .await
        .unwrap();
    assert!(first < d1.seq && d1.seq < d2.seq);
    assert_eq!(db.deployments().await.unwrap(), vec![d1, d2.clone()]);
    if let Some(other) = &other {
        assert!(other.next_id().await.unwrap() > d2.seq, "ids are shared");
    }

    // Rollouts, oldest first, replaced in place.
    let spec = RolloutSpec::new("a", 10, "*", &["1", "50%"]).unwrap();
    let members = vec![
        ("edge-1".to_string(), Some(9)),
        ("edge-2".to_string(), None),
    ];
    let (mut r1, _) = Rollout::start(5, spec.clone(), "carol", 100, members.clone());
    let (r0, _) = Rollout::start(3, spec, "carol", 90, members);
    db.put_rollout(&r1).await.unwrap();
    db.put_rollout(&r0).await.unwrap();
    r1.pause(101);
    db.put_rollout(&r1).await.unwrap();
    assert_eq!(db.rollouts().await.unwrap(), vec![r0, r1]);

    // Director counters default to nothing published.
    assert_eq!(
        db.director("edge-1").await.unwrap(),
        DirectorEntry::default()
    );
    let published = DirectorEntry {
        version: 4,
        content: "a/10 ts 3".into(),
    };
    db.put_director("edge-1", &published).await.unwrap();
    assert_eq!(db.director("edge-1").await.unwrap(), published);

    // The audit log: concurrent appends (from a second handle too) keep one whole chain.
    let mut appends = tokio::task::JoinSet::new();
    for i in 0..40 {
        let db = match (&other, i % 2) {
            (Some(o), 1) => o.clone(),
            _ => db.clone(),
        };
        appends.spawn(async move {
            db.append_audit("carol", "deploy", serde_json::json!({ "n": i }), i)
                .await
                .unwrap()
        });
    }
    let mut seqs: Vec<u64> = appends.join_all().await.iter().map(|e| e.seq).collect();
    seqs.sort();
    assert_eq!(seqs, (1..=40).collect::<Vec<u64>>());
    let log = db.audit(1).await.unwrap();
    assert_eq!(log.len(), 40);
    verify_chain(&log).unwrap();
    assert_eq!(db.audit(39).await.unwrap(), log[38..].to_vec());

    telemetry(&db, other.as_ref().unwrap_or(&db)).await;
    db.flush().await.unwrap();
}

fn report(device: &str, seq: u64, to_ms: i64, versions: &[u64]) -> TelemetryReport {
    let mut latency_buckets = LatencyBuckets::default();
    latency_buckets.add(250, 7);
    TelemetryReport {
        format: modelcast_proto::FORMAT_VERSION,
        device: device.into(),
        seq,
        from_ms: to_ms - 60_000,
        to_ms,
        dropped: 0,
        models: versions
            .iter()
            .map(|&version| ModelTelemetry {
                model: "classifier".into(),
                version,
                slot: if version % 2 == 0 { Slot::B } else { Slot::A },
                requests: 7 + seq,
                errors: seq,
                latency_us: None,
                latency_buckets: latency_buckets.clone(),
                outputs: vec![],
            })
            .collect(),
        system: Default::default(),
        samples: vec![],
        samples_dropped: 0,
    }
}

/// Every stored sample of the classifier.
fn every_sample() -> SampleQuery {
    SampleQuery {
        model: "classifier".into(),
        version: None,
        device: None,
        from_ms: i64::MIN,
        to_ms: i64::MAX,
        limit: 100,
        max_bytes: usize::MAX,
    }
}

fn sample(id: u64, version: u64, at_ms: i64) -> Sample {
    Sample {
        id,
        model: "classifier".into(),
        version,
        slot: Slot::A,
        at_ms,
        inputs: vec![TensorData::from_f32("x", vec![1, 2], &[id as f32, -1.0])],
        outputs: vec![TensorData::from_f32("y", vec![1], &[0.5])],
    }
}

/// Samples: kept once per device and id (from either handle), read back per model, version
/// and device, newest within the limits, oldest first; pruned with telemetry.
async fn samples(db: &Db, other: &Db, t0: i64) {
    let a = [
        sample(1, 1, t0 + 10),
        sample(2, 2, t0 + 20),
        sample(3, 2, t0 + 30),
    ];
    assert_eq!(db.add_samples("edge-1", t0 + 40, &a).await.unwrap(), 3);
    // The same ids from the same device: already stored, whoever receives them.
    assert_eq!(
        other.add_samples("edge-1", t0 + 50, &a[1..]).await.unwrap(),
        0
    );
    // The same ids from another device are other samples.
    let b = [sample(1, 2, t0 + 20)];
    assert_eq!(other.add_samples("edge-2", t0 + 41, &b).await.unwrap(), 1);
    let query = |version: Option<u64>, device: Option<&str>, limit: usize| SampleQuery {
        model: "classifier".into(),
        version,
        device: device.map(String::from),
        from_ms: t0,
        to_ms: t0 + 1000,
        limit,
        max_bytes: usize::MAX,
    };
    let seen = |found: Vec<StoredSample>| -> Vec<(String, u64, i64)> {
        found
            .into_iter()
            .map(|s| (s.device, s.sample.id, s.sample.at_ms - t0))
            .collect()
    };
    let all = db.samples(&query(None, None, 100)).await.unwrap();
    assert_eq!(all[0].sample, a[0]);
    assert_eq!(all[0].received_ms, t0 + 40);
    let e = |d: &str, id: u64, at: i64| (d.to_string(), id, at);
    assert_eq!(
        seen(all),
        vec![
            e("edge-1", 1, 10),
            e("edge-1", 2, 20),
            e("edge-2", 1, 20),
            e("edge-1", 3, 30)
        ]
    );
    assert_eq!(
        seen(
            other
                .samples(&query(Some(2), Some("edge-1"), 100))
                .await
                .unwrap()
        ),
        vec![e("edge-1", 2, 20), e("edge-1", 3, 30)]
    );
    // The newest within the limit, oldest first.
    assert_eq!(
        seen(db.samples(&query(None, None, 2)).await.unwrap()),
        vec![e("edge-2", 1, 20), e("edge-1", 3, 30)]
    );
    // A byte cap stops after the newest sample that reaches it.
    let capped = SampleQuery {
        max_bytes: 1,
        ..query(None, None, 100)
    };
    assert_eq!(
        seen(other.samples(&capped).await.unwrap()),
        vec![e("edge-1", 3, 30)]
    );
    let mut window = query(None, None, 100);
    window.from_ms = t0 + 25;
    assert_eq!(
        seen(db.samples(&window).await.unwrap()),
        vec![e("edge-1", 3, 30)]
    );
    window.model = "other".into();
    assert!(db.samples(&window).await.unwrap().is_empty());
}

/// Telemetry: the first copy of a report is kept, points come back per model in time order
/// (from a second handle too), and pruning removes what ended before the cut.
async fn telemetry(db: &Db, other: &Db) {
    let t0 = 1_700_000_000_000i64;
    // Negative and far times sort too.
    assert!(db
        .add_telemetry(&report("edge-1", 1, -5, &[1]))
        .await
        .unwrap());
    for (device, seq, at) in [
        ("edge-2", 1, 0),
        ("edge-1", 2, 60_000),
        ("edge-2", 2, 120_000),
    ] {
        let added = db
            .add_telemetry(&report(device, seq, t0 + at, &[1, 2]))
            .await
            .unwrap();
        assert!(added, "{device} #{seq}");
    }
    // A copy sent again, from either handle, is not stored twice.
    let again = report("edge-1", 2, t0 + 60_000, &[1, 2]);
    assert!(!db.add_telemetry(&again).await.unwrap());
    assert!(!other.add_telemetry(&again).await.unwrap());
    let points = other
        .model_telemetry("classifier", t0, t0 + 120_000)
        .await
        .unwrap();
    let seen: Vec<(&str, u64, i64, u64)> = points
        .iter()
        .map(|p| (p.device.as_str(), p.seq, p.to_ms - t0, p.telemetry.version))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("edge-2", 1, 0, 1),
            ("edge-2", 1, 0, 2),
            ("edge-1", 2, 60_000, 1),
            ("edge-1", 2, 60_000, 2),
            ("edge-2", 2, 120_000, 1),
            ("edge-2", 2, 120_000, 2),
        ]
    );
    assert_eq!(points[2].telemetry, again.models[0]);
    assert!(db
        .model_telemetry("classifier", t0 + 1, t0 + 59_999)
        .await
        .unwrap()
        .is_empty());
    assert!(db
        .model_telemetry("other", i64::MIN, i64::MAX)
        .await
        .unwrap()
        .is_empty());
    let edge1 = db
        .device_telemetry("edge-1", i64::MIN, i64::MAX, usize::MAX)
        .await
        .unwrap();
    assert_eq!(edge1.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(edge1[1], again);
    // A limit keeps the newest.
    let newest = other
        .device_telemetry("edge-1", i64::MIN, i64::MAX, 1)
        .await
        .unwrap();
    assert_eq!(newest, vec![again.clone()]);
    // Alerts: stored by id, changed in place, and a cleared one goes with pruning.
    let alert = |id: u64, cleared_ms: Option<i64>| modelcast_server::drift::Alert {
        id,
        device: "edge-1".into(),
        model: "classifier".into(),
        version: 2,
        kind: modelcast_server::drift::AlertKind::ClassDrift { output: "y".into() },
        test: "psi".into(),
        value: 0.4,
        threshold: 0.25,
        message: "class shares [5%, 95%]".into(),
        raised_ms: t0 - 10,
        cleared_ms,
    };
    db.put_alert(&alert(7, None)).await.unwrap();
    db.put_alert(&alert(8, None)).await.unwrap();
    other.put_alert(&alert(7, Some(t0 - 5))).await.unwrap();
    assert_eq!(
        db.alerts().await.unwrap(),
        vec![alert(7, Some(t0 - 5)), alert(8, None)]
    );
    samples(db, other, t0).await;
    // Pruning: the report at -5 ms and the first minute go, and the alert cleared before;
    // samples taken before the cut too.
    assert_eq!(db.prune_telemetry(t0 + 1).await.unwrap(), 2);
    let kept = other.samples(&every_sample()).await.unwrap();
    assert_eq!(kept.len(), 4, "every sample is after the cut");
    assert_eq!(db.prune_telemetry(t0 + 25).await.unwrap(), 0);
    let kept = db.samples(&every_sample()).await.unwrap();
    assert_eq!(kept.len(), 1, "samples before t0+25 pruned");
    let left = db
        .model_telemetry("classifier", i64::MIN, i64::MAX)
        .await
        .unwrap();
    assert_eq!(left.len(), 4);
    assert!(left.iter().all(|p| p.to_ms > t0));
    assert_eq!(
        db.device_telemetry("edge-2", i64::MIN, i64::MAX, usize::MAX)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(db.alerts().await.unwrap(), vec![alert(8, None)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let db = db::open_embedded(&dir.path().join("store")).unwrap();
    contract(db, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_keeps_the_contract_shared_by_two_replicas() {
    let pg = Postgres::start();
    let url = pg.database("contract");
    // Two replicas connecting at once both find (or make) the schema.
    let (a, b) = tokio::join!(db::connect(&url), db::connect(&url));
    contract(a.unwrap(), Some(b.unwrap())).await;
    // A third connection later sees everything the others wrote.
    let c = db::connect(&url).await.unwrap();
    assert_eq!(c.devices().await.unwrap().len(), 3);
    verify_chain(&c.audit(1).await.unwrap()).unwrap();
}
