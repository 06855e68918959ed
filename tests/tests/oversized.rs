//! A device that publishes the largest message the broker allows on its own topics (a 2 MiB
//! retained state report) cannot cut the server off: the server reads whatever the broker
//! accepts, drops the report as invalid, and goes on serving the fleet. Before, its MQTT client
//! took at most 1 MiB: every connection ended on that retained message, again and again, and
//! no deploy moved a byte. The server (the embedded broker included) grows by little more
//! than the one message it keeps.

use modelcast_tests::{proc_status_kib, Fleet, Rogue};

#[test]
fn a_retained_message_as_large_as_the_broker_allows_does_not_cut_the_server_off() {
    let fleet = Fleet::embedded();
    let _agent = fleet.start_agent_with("edge-1", &[("site", "lab")], "");
    fleet.wait_registered();
    let memory_before = proc_status_kib(fleet.server_pid(), "VmHWM");
    let rogue = Rogue::connect(fleet.mqtt_port, None);
    let topic = modelcast_proto::topic::Topics::new("modelcast")
        .device("evil-1", modelcast_proto::topic::DeviceTopic::State);
    rogue.publish_raw(&topic, true, vec![b'x'; 2 << 20]);
    // The fleet still deploys, through the same server connection.
    fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "site=lab");
    fleet.wait_serving("edge-1", "classifier", 1);
    let log = fleet.server_log();
    let connects = log.matches("server connected to broker").count();
    assert_eq!(
        connects, 1,
        "the server's broker connection dropped:\n{log}"
    );
    // The retained 2 MiB, a copy or two of it on the way, and the deploy's own work.
    let memory_grew = proc_status_kib(fleet.server_pid(), "VmHWM").saturating_sub(memory_before);
    println!(
        "a retained 2 MiB state report: the fleet deployed over the same connection; the \
         server's peak memory grew {} MiB",
        memory_grew >> 10
    );
    assert!(memory_grew < 64 << 10, "the server grew {memory_grew} KiB");
}
