//! Writes one valid input per fuzz target into `corpus/<target>/seed-*`, so that the fuzzers
//! start from documents that get past the JSON parser and into the checks behind it.
//!
//!     cargo run --bin seeds [corpus dir, default: corpus]

use std::collections::BTreeMap;
use std::path::Path;

use modelcast_agent::store::{ModelRecord, Trial};
use modelcast_fuzz::{keys, root, trust, DEVICE, EXPIRES};
use modelcast_proto::chunk::{ChunkReply, ChunkRequest};
use modelcast_proto::report::{
    DeviceReport, ModelState, Phase, ReportedError, Slot, SlotContent, UpdateProgress,
};
use modelcast_proto::verify::fixture;

fn main() -> std::io::Result<()> {
    let corpus = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let write = |target: &str, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let dir = Path::new(&corpus).join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{name}")), bytes)
    };

    let m1 = fixture::manifest("classifier", 1, &[1u8; 100], 16);
    let m2 = fixture::manifest("classifier", 2, &[2u8; 70], 32);
    let desired = keys().desired(DEVICE, &[m1.clone(), m2.clone()], 3, EXPIRES);
    let repo = &desired.repository;

    write("desired", "two-models", &desired.to_vec())?;
    for (name, env) in [
        ("root", root()),
        ("timestamp", &repo.timestamp),
        ("snapshot", &repo.snapshot),
        ("targets", &repo.targets),
        ("director", &desired.director),
    ] {
        write("envelope", name, &env.to_vec())?;
    }
    for (which, name, env) in [
        (0u8, "root", root()),
        (4, "next-root", root()),
        (1, "timestamp", &repo.timestamp),
        (2, "snapshot", &repo.snapshot),
        (3, "targets", &repo.targets),
    ] {
        let mut bytes = vec![which];
        bytes.extend(env.to_vec());
        write("tuf_metadata", name, &bytes)?;
    }
    write("manifest", "v1", &serde_json::to_vec(&m1.to_target())?)?;

    let request = ChunkRequest {
        format: modelcast_proto::FORMAT_VERSION,
        device: DEVICE.into(),
        artifact: m1.sha256.clone(),
        chunks: vec![0, 1, 5],
        again: vec![2],
        shared: true,
        joined: true,
        zstd: false,
    };
    write("chunk", "request", &request.to_vec())?;
    let reply = ChunkReply {
        artifact: [7; 32],
        index: 3,
        encoding: modelcast_proto::chunk::Encoding::Raw,
        data: &[1, 2, 3, 4, 5],
    };
    write("chunk", "reply", &reply.encode())?;

    let slot = |m: &modelcast_proto::manifest::Manifest| SlotContent {
        version: m.version,
        sha256: m.sha256.clone(),
    };
    let report = DeviceReport {
        format: modelcast_proto::FORMAT_VERSION,
        device: DEVICE.into(),
        labels: BTreeMap::from([("site".into(), "berlin".into())]),
        agent_version: "0.1.0".into(),
        models: BTreeMap::from([(
            "classifier".into(),
            ModelState {
                active: Some(Slot::A),
                a: Some(slot(&m1)),
                b: Some(slot(&m2)),
                update: Some(UpdateProgress {
                    version: 2,
                    phase: Phase::Downloading,
                    received_bytes: 32,
                    total_bytes: 70,
                    reused_bytes: 16,
                    held: None,
                }),
                engine: None,
                shadow: None,
                canary: Some(modelcast_proto::report::CanaryState {
                    version: 2,
                    percent: 10,
                    key: Some("x-user".into()),
                }),
                low_memory_swap_ms: Some(223),
            },
        )]),
        last_error: Some(ReportedError {
            model: Some("classifier".into()),
            version: Some(2),
            kind: modelcast_proto::report::ErrorKind::Stalled,
            reason: "download stalled".into(),
            at: 1_800_000_000,
        }),
        desired_version: 3,
        at: 1_800_000_000,
        engines: None,
        sealing_key: None,
    };
    write("report", "downloading", &report.to_vec())?;
    // A telemetry report as the agent writes it.
    write(
        "telemetry",
        "report",
        br#"{"format":1,"device":"edge-1","seq":3,"from_ms":1000,"to_ms":61000,"dropped":2,"models":[{"model":"classifier","version":2,"slot":"b","requests":10,"errors":1,"latency_us":{"p50":120,"p95":300,"p99":450,"max":900},"outputs":[{"name":"scores","count":40,"mean":0.25,"variance":0.01,"min":0.0,"max":0.9,"non_finite":0,"classes":[7,2,0,1]}]}],"system":{"cpu_ms":12,"rss_bytes":31457280,"store_bytes":1048576,"disk_free_bytes":1073741824,"queued":1}}"#,
    )?;

    write(
        "infer_request",
        "fp32",
        br#"{"id":"r1","inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[[0.5,-1,2e3,0]]}]}"#,
    )?;
    write(
        "infer_request",
        "two-inputs",
        br#"{"inputs":[{"name":"a","shape":[2],"datatype":"INT64","data":[1,2]},{"name":"b","shape":[1],"datatype":"BOOL","data":[true]}]}"#,
    )?;

    let record = ModelRecord {
        active: Some(Slot::B),
        a: Some(m1.clone()),
        b: Some(m2),
        highest_version: 2,
        trial: Some(Trial {
            slot: Slot::B,
            previous: Slot::A,
            boots: 1,
            thresholds: Some(modelcast_proto::desired::TrialThresholds {
                requests: Some(30),
                seconds: Some(3),
                ..Default::default()
            }),
        }),
        failed: None,
    };
    write("store_record", "model", &serde_json::to_vec(&record)?)?;
    write("store_record", "trust", &serde_json::to_vec(&trust())?)?;
    write("store_record", "pending", &serde_json::to_vec(&m1)?)?;
    Ok(())
}
