//! Sampled inputs and outputs end to end: two real agents serve the example classifier and
//! report telemetry every second. One group's deployment turns sampling on (every request,
//! a 64 KiB budget); the other's does not.
//!
//! - Every request the sampled device answered reaches the server once, with exactly the
//!   input sent and the output returned; the other device ships none.
//! - `modelcast samples` writes them as JSON lines whose inputs, sent again to the inference
//!   API, give the recorded outputs.
//! - A viewer may not read them (see `access.rs`); a device that sends samples unasked has
//!   them dropped and counted.
//! - A deployment without sampling turns it off: the device stops sampling and ships nothing
//!   more.

use std::time::Duration;

use modelcast_proto::desired::SamplingSpec;
use modelcast_proto::manifest::TensorData;
use modelcast_proto::report::Slot;
use modelcast_proto::telemetry::{Sample, TelemetryReport};
use modelcast_proto::topic::{DeviceTopic, Topics};
use modelcast_server::api::SampleRequest;
use modelcast_server::db::StoredSample;
use modelcast_tests::{bin, wait_for, Fleet, Rogue};

fn samples(fleet: &Fleet, device: Option<&str>) -> Vec<StoredSample> {
    fleet
        .client
        .samples(&SampleRequest {
            model: "classifier".into(),
            version: None,
            device: device.map(String::from),
            since_secs: 3600,
            limit: 1000,
        })
        .expect("samples")
}

/// Values as the model's FP32 (JSON readers may round a float's last bit differently).
fn f32s(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&v| v as f32).collect()
}

/// The newest report sequence number the server holds from `device`.
fn last_report(fleet: &Fleet, device: &str) -> u64 {
    fleet
        .client
        .device_telemetry(device, 3600)
        .expect("telemetry")
        .last()
        .map_or(0, |r| r.seq)
}

#[test]
fn sampled_requests_reach_the_server_whole_and_only_where_a_deployment_asks() {
    let fleet = Fleet::embedded();
    let config = "[telemetry]\ninterval_secs = 1\n";
    let sampled = fleet.start_agent_with("sampled", &[("ring", "a")], config);
    let plain = fleet.start_agent_with("plain", &[("ring", "b")], config);
    wait_for("two devices", Duration::from_secs(30), || {
        (fleet.client.devices().ok()?.len() == 2).then_some(())
    });
    let v1 = fleet.publish_example(1, 16);
    let spec = SamplingSpec {
        rate_permille: 1000,
        budget_bytes: 64 * 1024,
    };
    fleet.deploy_sampled("classifier", 1, "ring=a", Some(spec));
    fleet.deploy_sampled("classifier", 1, "ring=b", None);
    fleet.wait_serving("sampled", "classifier", 1);
    fleet.wait_serving("plain", "classifier", 1);

    // 20 different inputs to each device; what each answered.
    let golden = &v1.golden[0].inputs[0];
    let input = |i: usize| {
        let x: Vec<f32> = (0..4).map(|j| (i * 4 + j) as f32 * 0.25 - 5.0).collect();
        vec![TensorData::from_f32(&golden.name, golden.shape.clone(), &x)]
    };
    let mut answers = Vec::new();
    for i in 0..20 {
        let (_, out) = sampled.infer("classifier", &input(i)).expect("inference");
        answers.push((f32s(&input(i)[0].values().unwrap()), f32s(&out)));
        plain.infer("classifier", &input(i)).expect("inference");
    }
    let got = wait_for("20 samples on the server", Duration::from_secs(30), || {
        let s = samples(&fleet, None);
        (s.len() >= 20).then_some(s)
    });
    assert_eq!(got.len(), 20, "each sample once");
    let mut ids: Vec<u64> = got.iter().map(|s| s.sample.id).collect();
    ids.sort();
    assert_eq!(ids, (1..=20).collect::<Vec<u64>>());
    for s in &got {
        assert_eq!(s.device, "sampled");
        assert_eq!(
            (s.sample.model.as_str(), s.sample.version),
            ("classifier", 1)
        );
        let x = f32s(&s.sample.inputs[0].values().unwrap());
        let y = f32s(&s.sample.outputs[0].values().unwrap());
        assert!(
            answers.contains(&(x.clone(), y.clone())),
            "sample {} is not a request sent with its answer: {x:?} → {y:?}",
            s.sample.id
        );
    }
    let bytes: Vec<usize> = got
        .iter()
        .map(|s| serde_json::to_vec(&s.sample).unwrap().len())
        .collect();
    println!(
        "a sample of the example classifier is {}..{} bytes in a report",
        bytes.iter().min().unwrap(),
        bytes.iter().max().unwrap()
    );

    // The CLI: JSON lines of Open Inference Protocol tensors; replayed, each input gives its
    // recorded output.
    let file = fleet.dir.path().join("samples.jsonl");
    let out = std::process::Command::new(bin("modelcast"))
        .args([
            "--server",
            fleet.client.base(),
            "samples",
            "--model",
            "classifier",
        ])
        .args(["--since", "1h", "--out"])
        .arg(&file)
        .output()
        .expect("modelcast samples");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 20);
    for line in &lines[..3] {
        let body = serde_json::json!({ "inputs": line["inputs"] });
        let answer = ureq::post(format!(
            "http://127.0.0.1:{}/v2/models/classifier/infer",
            sampled.http_port
        ))
        .send_json(&body)
        .expect("replay")
        .body_mut()
        .read_json::<serde_json::Value>()
        .unwrap();
        assert_eq!(answer["outputs"][0]["data"], line["outputs"][0]["data"]);
    }
    // Sampling is still on: the replays are samples too.
    wait_for("the replays sampled", Duration::from_secs(30), || {
        (samples(&fleet, None).len() == 23).then_some(())
    });

    // The other device shipped nothing, though it reported all along.
    wait_for(
        "two reports from the other device",
        Duration::from_secs(30),
        || (last_report(&fleet, "plain") >= 2).then_some(()),
    );
    assert!(samples(&fleet, Some("plain")).is_empty());

    // A device that sends samples unasked: dropped and counted.
    let refused_before = fleet.client.status().unwrap().telemetry.samples_refused;
    let rogue = Rogue::connect(fleet.mqtt_port, None);
    let forged = TelemetryReport {
        format: modelcast_proto::FORMAT_VERSION,
        device: "plain".into(),
        seq: 1_000_000,
        from_ms: modelcast_server::unix_now_ms() - 1000,
        to_ms: modelcast_server::unix_now_ms(),
        dropped: 0,
        models: vec![],
        system: Default::default(),
        samples: vec![Sample {
            id: 1,
            model: "classifier".into(),
            version: 1,
            slot: Slot::A,
            at_ms: modelcast_server::unix_now_ms(),
            inputs: input(0),
            outputs: vec![],
        }],
        samples_dropped: 0,
    };
    let topic = Topics::new("modelcast").device("plain", DeviceTopic::Telemetry);
    rogue.publish_raw(&topic, false, forged.to_vec());
    wait_for(
        "the unasked sample refused",
        Duration::from_secs(20),
        || {
            let status = fleet.client.status().ok()?;
            (status.telemetry.samples_refused > refused_before).then_some(())
        },
    );
    assert!(samples(&fleet, Some("plain")).is_empty());
    let metrics = fleet.client.metrics().unwrap();
    assert!(
        metrics.contains("modelcast_fleet_samples_total{result=\"refused\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("modelcast_fleet_samples_total{result=\"stored\"} 23"),
        "{metrics}"
    );

    // Sampling off: the device stops, and nothing more arrives over several reports.
    fleet.deploy_sampled("classifier", 1, "ring=a", None);
    wait_for(
        "sampling off on the device",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(sampled.log_path())
                .ok()?
                .contains("sampling policies={}")
                .then_some(())
        },
    );
    for i in 20..30 {
        sampled.infer("classifier", &input(i)).expect("inference");
    }
    let seq = last_report(&fleet, "sampled");
    wait_for("three more reports", Duration::from_secs(30), || {
        (last_report(&fleet, "sampled") >= seq + 3).then_some(())
    });
    assert_eq!(
        samples(&fleet, None).len(),
        23,
        "no sample after sampling stopped"
    );
}
