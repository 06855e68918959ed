//! Chunks over HTTP beside MQTT: a deployment that gives a base URL has its devices fetch
//! chunk ranges there — from the fleet server's `/files` and from a real nginx (Debian's)
//! serving copies of the files — while MQTT carries control and reports (the server's MQTT
//! chunk counter does not move). Over HTTPS, the host's certificate is checked against the
//! fleet's CA: nginx with one of it serves, one with another CA's is refused. A host that
//! ignores the range (200 instead of 206) or sends another range is refused with the reason in
//! the agent's log, and MQTT carries the chunks.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use modelcast_proto::desired::DownloadPolicy;
use modelcast_tests::{wait_for, Agent, AgentOptions, Fleet, Nginx};

const MIB: u64 = 1 << 20;
const HTTP_CHUNKS: &str = "modelcast_http_chunks_total";
const FALLBACKS: &str = "modelcast_http_fallbacks_total";

fn over(base: &str) -> DownloadPolicy {
    DownloadPolicy {
        http: Some(base.into()),
        ..DownloadPolicy::default()
    }
}

fn agent(fleet: &Fleet) -> Agent {
    let agent = fleet.start_agent_opts("edge-1", &[("site", "lab")], AgentOptions::committing());
    fleet.wait_registered();
    agent
}

/// The server's file `sha256`, whole.
fn file(fleet: &Fleet, sha256: &str) -> Vec<u8> {
    ureq::get(format!("{}/files/{sha256}", fleet.client.base()))
        .call()
        .unwrap()
        .body_mut()
        .with_config()
        .limit(64 * MIB)
        .read_to_vec()
        .unwrap()
}

fn mqtt_chunk_bytes(fleet: &Fleet) -> u64 {
    fleet.client.status().unwrap().chunk_requests.raw_bytes
}

#[test]
fn chunks_come_over_http_from_the_server_and_from_nginx() {
    let fleet = Fleet::embedded();
    let agent = agent(&fleet);
    let v1 = fleet.publish_example_of_size("classifier", 1, 3 * MIB);
    assert!(v1.chunks.len() > 4);

    // From the server's own /files.
    fleet.deploy_policy(
        "classifier",
        1,
        "*",
        over(&format!("{}/files", fleet.client.base())),
    );
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");
    let fetched = agent.metric(HTTP_CHUNKS).unwrap_or(0.0) as usize;
    assert!(fetched >= v1.chunks.len(), "{fetched} chunks over HTTP");
    assert_eq!(mqtt_chunk_bytes(&fleet), 0, "no chunk over MQTT");

    // The server gives the whole file, and any range of it, to anyone who names it.
    let url = format!("{}/files/{}", fleet.client.base(), v1.sha256);
    let whole = file(&fleet, &v1.sha256);
    assert_eq!(modelcast_proto::sha256_hex(&whole), v1.sha256);
    let mut part = ureq::get(&url)
        .header("Range", "bytes=10-19")
        .call()
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 10-19/{}", v1.size)
    );
    assert_eq!(part.body_mut().read_to_vec().unwrap(), whole[10..20]);

    // From nginx, serving copies of version 2's files.
    let v2 = fleet.publish_example_of_size("classifier", 2, 3 * MIB);
    let root = fleet.dir.path().join("cdn");
    std::fs::create_dir_all(&root).unwrap();
    for part in v2.parts() {
        std::fs::write(root.join(part.sha256), file(&fleet, part.sha256)).unwrap();
    }
    let nginx = Nginx::serve(fleet.dir.path(), &root);
    fleet.deploy_policy("classifier", 2, "*", over(&nginx.base()));
    fleet.wait_serving("edge-1", "classifier", 2);
    assert_eq!(agent.check_golden(&v2), "2");
    let ranges = nginx.answered(fleet.dir.path(), 206);
    println!(
        "v1: {fetched} chunks from the server's /files; v2: {ranges} ranges from nginx; \
         MQTT chunk bytes: {}",
        mqtt_chunk_bytes(&fleet)
    );
    assert!(
        ranges >= 1,
        "nginx served the chunks v2 did not share with v1"
    );
    assert_eq!(mqtt_chunk_bytes(&fleet), 0, "still no chunk over MQTT");
    assert_eq!(agent.metric(FALLBACKS).unwrap_or(0.0), 0.0);
}

/// A host that answers every request with `answer` (its headers; the body is `body` bytes of
/// zeros) until dropped.
struct Hostile {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Hostile {
    fn serve(answer: &'static str, body: usize) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            // Bounded in connections; a drop wakes the accept with a connection of its own.
            for _ in 0..10_000 {
                let Ok((mut s, _)) = listener.accept() else {
                    continue;
                };
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16_384 {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer.as_bytes());
                let _ = s.write_all(&vec![0u8; body]);
            }
        });
        Hostile { port, stop }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}/files", self.port)
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

#[test]
fn a_host_that_ignores_the_range_or_sends_another_is_refused_and_mqtt_carries_the_chunks() {
    let fleet = Fleet::embedded();
    let agent = agent(&fleet);
    let log_says = |what: &str| {
        std::fs::read_to_string(agent.log_path())
            .unwrap_or_default()
            .contains(what)
    };

    // 200 and the whole (here: any) body: the range was ignored.
    let v1 = fleet.publish_example_of_size("classifier", 1, 2 * MIB);
    let ignores = Hostile::serve(
        "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n",
        1000,
    );
    fleet.deploy_policy("classifier", 1, "*", over(&ignores.base()));
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");
    assert!(log_says("answered 200 instead of 206"));
    assert_eq!(agent.metric(FALLBACKS), Some(1.0));
    let carried = mqtt_chunk_bytes(&fleet);
    assert!(carried >= v1.size, "MQTT carried the artifact: {carried}");

    // 206, but another range.
    let v2 = fleet.publish_example_of_size("classifier", 2, 2 * MIB);
    let wrong = Hostile::serve(
        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-0/1\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
        1,
    );
    fleet.deploy_policy("classifier", 2, "*", over(&wrong.base()));
    fleet.wait_serving("edge-1", "classifier", 2);
    assert_eq!(agent.check_golden(&v2), "2");
    assert!(log_says("sent \"bytes 0-0/1\" for bytes"));
    assert_eq!(agent.metric(FALLBACKS), Some(2.0));
    wait_for("the report of v2", Duration::from_secs(10), || {
        let r = fleet.report("edge-1")?;
        (r.models.get("classifier")?.serving_version() == Some(2)).then_some(())
    });
}

/// Over HTTPS: nginx serving the files with a certificate of the fleet's own CA (the one the
/// broker's TLS uses), which the agent checks against the CA in its `[tls]` configuration.
#[test]
fn chunks_come_over_https_checked_against_the_fleet_ca() {
    let fleet = Fleet::embedded_tls();
    let agent = agent(&fleet);
    let v1 = fleet.publish_example_of_size("classifier", 1, 3 * MIB);
    let root = fleet.dir.path().join("cdn");
    std::fs::create_dir_all(&root).unwrap();
    for part in v1.parts() {
        std::fs::write(root.join(part.sha256), file(&fleet, part.sha256)).unwrap();
    }
    let pki = fleet.pki.clone().expect("a TLS fleet");
    let nginx = Nginx::serve_tls(
        fleet.dir.path(),
        &root,
        &pki.join("broker.pem"),
        &pki.join("broker.key"),
    );
    assert!(nginx.base().starts_with("https://"));
    fleet.deploy_policy("classifier", 1, "*", over(&nginx.base()));
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");
    let ranges = nginx.answered(fleet.dir.path(), 206);
    println!("v1: {ranges} ranges from nginx over HTTPS");
    assert!(
        ranges >= v1.chunks.len(),
        "{ranges} ranges for {} chunks",
        v1.chunks.len()
    );
    assert_eq!(mqtt_chunk_bytes(&fleet), 0, "no chunk over MQTT");
    assert_eq!(agent.metric(FALLBACKS).unwrap_or(0.0), 0.0);

    // A host whose certificate another CA signed is refused, and MQTT carries the chunks.
    let v2 = fleet.publish_example_of_size("classifier", 2, 3 * MIB);
    for part in v2.parts() {
        std::fs::write(root.join(part.sha256), file(&fleet, part.sha256)).unwrap();
    }
    let other = fleet.dir.path().join("other-pki");
    modelcast_server::pki::init(&other, &["127.0.0.1".into()]).unwrap();
    let impostor = Nginx::serve_tls(
        fleet.dir.path(),
        &root,
        &other.join("broker.pem"),
        &other.join("broker.key"),
    );
    fleet.deploy_policy("classifier", 2, "*", over(&impostor.base()));
    fleet.wait_serving("edge-1", "classifier", 2);
    assert_eq!(agent.check_golden(&v2), "2");
    assert_eq!(
        impostor.answered(fleet.dir.path(), 206),
        0,
        "not one range taken"
    );
    assert!(agent.metric(FALLBACKS).unwrap_or(0.0) >= 1.0);
    assert!(mqtt_chunk_bytes(&fleet) > 0, "MQTT carried v2");
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    assert!(log.contains("certificate"), "the reason, in the log: {log}");
}
