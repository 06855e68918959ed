//! The operator API stays reachable under a connection flood: connections beyond the cap are
//! closed as they are accepted, and a client that trickles its headers (or sends none) is cut
//! off after the header timeout, so the API answers again as soon as the flood's connections
//! time out, and a device keeps being served over MQTT throughout. The server's peak memory
//! stays within a budget while it does (before the cap, ~20,000 such connections exhausted its
//! descriptors and the embedded broker refused devices).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use modelcast_tests::{proc_status_kib, wait_for, Fleet};

/// Half-open connections opened at once (the test process holds one descriptor for each).
const FLOOD: usize = 400;

#[test]
fn a_flood_of_half_open_connections_is_cut_off_and_the_api_answers_again() {
    let fleet = Fleet::embedded_with(&[
        "--http-max-connections",
        "8",
        "--http-header-timeout-secs",
        "1",
    ]);
    let _agent = fleet.start_agent_with("edge-1", &[("site", "lab")], "");
    fleet.wait_registered();
    let addr = fleet
        .client
        .base()
        .trim_start_matches("http://")
        .to_string();

    // 8 general connections and the 32 of the loopback reserve, then the rest: slowloris,
    // each sending the start of a request and never its end.
    let memory_before = proc_status_kib(fleet.server_pid(), "VmHWM");
    let started = Instant::now();
    let mut flood: Vec<TcpStream> = (0..FLOOD)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /api/v1/devices HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        })
        .collect();
    // Every one of them is closed by the server: over the cap at once, the others when their
    // headers do not arrive within the second.
    let mut closed_after = Vec::new();
    for s in &mut flood {
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).unwrap_or(0);
        closed_after.push(started.elapsed());
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    let last = closed_after.iter().max().unwrap();
    assert!(*last < Duration::from_secs(8), "held for {last:?}");
    let memory_grew = proc_status_kib(fleet.server_pid(), "VmHWM").saturating_sub(memory_before);
    assert!(memory_grew < 32 << 10, "the server grew {memory_grew} KiB");
    // The API answers again, and the device was served all along.
    wait_for("the API to answer", Duration::from_secs(10), || {
        fleet.client.devices().ok()
    });
    fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "site=lab");
    fleet.wait_serving("edge-1", "classifier", 1);
    println!(
        "{FLOOD} half-open connections: all closed within {:.1} s; the server's peak memory \
         grew {} KiB",
        last.as_secs_f64(),
        memory_grew
    );
}
