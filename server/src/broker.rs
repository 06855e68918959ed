//! The embedded MQTT broker (rumqttd), so one command runs a whole fleet. Any external
//! broker (mosquitto, EMQX, …) can replace it.
//!
//! With a PKI it speaks TLS only and requires a client certificate signed by the fleet CA.
//! It has no per-topic ACLs: any client with a valid certificate may use any topic (see
//! `docs/security.md`; mosquitto with [`crate::acl`] isolates devices from each other). Its
//! sessions are bound to certificates through their organization ([`crate::pki::client_name`]).

use std::collections::HashMap;
use std::net::SocketAddr;

use std::path::Path;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};

/// Largest MQTT payload the embedded broker accepts: a 4 MiB chunk plus framing.
pub const MAX_PAYLOAD: usize = 4 * 1024 * 1024 + 64 * 1024;

/// The broker's configuration for one MQTT 3.1.1 listener: plain TCP, or TLS with client
/// certificates from the PKI in `pki` (`ca.pem`, `broker.pem`, `broker.key`).
pub fn config(listen: SocketAddr, pki: Option<&Path>) -> Config {
    let tls = pki.map(|dir| {
        let file = |f: &str| dir.join(f).display().to_string();
        TlsConfig::Rustls {
            capath: Some(file("ca.pem")),
            certpath: file("broker.pem"),
            keypath: file("broker.key"),
        }
    });
    let server = ServerSettings {
        name: "modelcast-v4".into(),
        listen,
        tls,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PAYLOAD,
            max_inflight_count: 256,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 256,
            // The router keeps a commit log per filter: bound it (chunks are large). Each
            // device has its own chunk topic, so this is per device that downloads: up to
            // 64 MiB, enough for an agent's default window (64 chunks of 256 KiB) without
            // losing chunks to the log's rollover, but 1,000 devices fetching an 8 MB model at
            // once took the server to 20 GB (bench-fleet). Large fleets: mosquitto.
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}

/// Starts the broker on its own threads; it runs until the process exits.
pub fn start(listen: SocketAddr, pki: Option<&Path>) -> std::io::Result<()> {
    // Fail early and clearly if the port is taken or a PKI file is missing: rumqttd would
    // only log it.
    drop(std::net::TcpListener::bind(listen)?);
    let config = config(listen, pki);
    for server in config.v4.iter().flat_map(|v| v.values()) {
        if let Some(tls) = &server.tls {
            if !tls.validate_paths() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the PKI directory lacks ca.pem, broker.pem or broker.key",
                ));
            }
        }
    }
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })?;
    Ok(())
}
