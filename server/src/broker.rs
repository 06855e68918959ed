//! The embedded MQTT broker (rumqttd), so one command runs a whole fleet. Any external
//! broker (mosquitto, EMQX, …) can replace it.

use std::collections::HashMap;
use std::net::SocketAddr;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Largest MQTT payload the embedded broker accepts: a 4 MiB chunk plus framing.
pub const MAX_PAYLOAD: usize = 4 * 1024 * 1024 + 64 * 1024;

/// The broker's configuration for one plain-TCP MQTT 3.1.1 listener.
pub fn config(listen: SocketAddr) -> Config {
    let server = ServerSettings {
        name: "modelcast-v4".into(),
        listen,
        tls: None,
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
            // The router keeps a commit log per filter: bound it (chunks are large).
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}

/// Starts the broker on its own threads; it runs until the process exits.
pub fn start(listen: SocketAddr) -> std::io::Result<()> {
    // Fail early and clearly if the port is taken: rumqttd would only log it.
    drop(std::net::TcpListener::bind(listen)?);
    let mut broker = Broker::new(config(listen));
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })?;
    Ok(())
}
