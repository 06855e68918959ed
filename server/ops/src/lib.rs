//! modelcast-ops: the operators' side of a modelcast fleet, kept out of the fleet server
//! daemon (which runs no model and links no inference engine).
//!
//! - [`onnx`]: reading an ONNX file's interface (external data inlined, `metadata_props`),
//!   and the example models the tests and demos publish.
//! - [`shapes`]: input shapes settled from the operator's `--input-shape` specs.
//! - [`convert`]: the artifact made (NNEF or ONNX), typed with tract and proved with the
//!   device's own engine ([`modelcast_agent::engine`]).
//! - [`publish`]: a manifest built (golden vectors), signed and uploaded.
//! - [`segments`]: where an artifact's tensors lie, so that its chunks start at them.
//! - [`signing`]: what operators sign offline: a version into or out of its hash bin,
//!   re-delegation after a key rotation, yearly re-signing.
//! - [`client`]: the API client the `modelcast` CLI (`src/bin/modelcast/`) uses.

#![forbid(unsafe_code)]

pub mod client;
pub mod convert;
pub mod onnx;
pub mod publish;
pub mod segments;
pub mod shapes;
pub mod signing;
