//! What `modelcast publish` and `modelcast convert` tell the operator about a prepared model:
//! its interface as published, the format chosen and why, and what was left out.

use modelcast_ops::publish::Prepared;

/// Says what publishing chose and left out.
pub fn report(p: &Prepared) {
    let m = &p.manifest;
    for (label, specs) in [("input", &m.inputs), ("output", &m.outputs)] {
        for t in specs.iter() {
            println!("{label} {} {} {}", t.name, t.datatype, t.describe_shape());
        }
    }
    if let Some(why) = &p.fallback_reason {
        println!("shipping the ONNX file (agents need the `onnx` feature): {why}");
    }
    if let Some(d) = p.nnef_max_diff {
        println!("NNEF proved against the ONNX model: max abs difference {d:.3e}");
    }
    if let Some(bytes) = m.memory_bytes {
        println!(
            "memory to load and answer once: {} (devices check it before loading it beside the serving model)",
            modelcast_agent::memory::mib(bytes)
        );
    }
    for (name, why) in &p.dropped_outputs {
        println!("output {name} left out: {why}");
    }
    if !p.props_left_out.is_empty() {
        println!(
            "metadata_props too large for the manifest, left out: {}",
            p.props_left_out.join(", ")
        );
    }
    if let Some(s) = m.metadata.get("shapes") {
        println!("{s}");
    }
    if let Some(g) = m.metadata.get("golden") {
        println!("golden vector {g}");
    }
}
