//! The Open Inference Protocol (KServe v2) codec: inference requests and responses as JSON,
//! with Triton's binary tensor data extension, to and from host tensors. No I/O: `serve.rs`
//! hands it bodies and headers and writes what it returns.
//!
//! A request is a JSON header, optionally followed by raw little-endian tensors: the header's
//! length is then in the `Inference-Header-Content-Length` HTTP header, and each input whose
//! bytes follow says how many in `parameters.binary_data_size`, in input order. A response
//! carries an output in binary when the request asks (the output's `parameters.binary_data`,
//! else the request's `parameters.binary_data_output`).
//!
//! Untrusted bytes: every size is checked against the body and the configured limit before
//! anything is allocated for it, and nothing here panics on input.

use std::collections::BTreeMap;
use std::fmt;

use modelcast_proto::manifest::DataType;
use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::engine::{HostTensor, Values};

/// The HTTP header that gives the JSON header's length of a binary request or response.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The extensions of the protocol this codec and the routes speak.
pub const EXTENSIONS: [&str; 5] = [
    "binary_tensor_data",
    "parameters",
    "statistics",
    "model_configuration",
    "model_repository",
];

/// A request that cannot be decoded; the message is for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

fn err(message: impl Into<String>) -> CodecError {
    CodecError(message.into())
}

/// An output the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedOutput {
    /// Output name.
    pub name: String,
    /// Its own binary choice, if it made one.
    pub binary: Option<bool>,
}

/// A decoded inference request.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    /// The client's request id, echoed in the response.
    pub id: Option<String>,
    /// Input tensors.
    pub inputs: Vec<HostTensor>,
    /// The outputs asked for (empty: all).
    pub outputs: Vec<RequestedOutput>,
    /// Whether outputs without a choice of their own come back binary.
    pub binary_output: bool,
}

#[derive(Deserialize)]
struct RequestJson<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: BTreeMap<String, Value>,
    #[serde(borrow)]
    inputs: Vec<InputJson<'a>>,
    #[serde(default)]
    outputs: Vec<OutputRequestJson>,
}

#[derive(Deserialize)]
struct InputJson<'a> {
    name: String,
    shape: Vec<u64>,
    datatype: String,
    #[serde(default)]
    parameters: BTreeMap<String, Value>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct OutputRequestJson {
    name: String,
    #[serde(default)]
    parameters: BTreeMap<String, Value>,
}

fn bool_param(params: &BTreeMap<String, Value>, key: &str) -> Result<Option<bool>, CodecError> {
    match params.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(err(format!(
            "parameter {key} must be a boolean, not {other}"
        ))),
    }
}

/// Decodes a request body. `header_length` is the `Inference-Header-Content-Length` value
/// (binary tensors follow the JSON), `max_tensor_bytes` bounds each input.
pub fn parse_request(
    body: &[u8],
    header_length: Option<usize>,
    max_tensor_bytes: usize,
) -> Result<InferRequest, CodecError> {
    let (json, mut binary) = match header_length {
        Some(n) if n > body.len() => {
            return Err(err(format!(
                "Inference-Header-Content-Length {n} exceeds the body's {} bytes",
                body.len()
            )))
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    let req: RequestJson =
        serde_json::from_slice(json).map_err(|e| err(format!("invalid request: {e}")))?;
    let mut inputs = Vec::with_capacity(req.inputs.len().min(64));
    for input in req.inputs {
        let name = input.name;
        let datatype: DataType = input
            .datatype
            .parse()
            .map_err(|e| err(format!("input {name}: {e}")))?;
        let binary_size = match input.parameters.get("binary_data_size") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| err(format!("input {name}: bad binary_data_size {v}")))?,
            ),
        };
        let bytes = match (binary_size, input.data) {
            (Some(_), Some(_)) => {
                return Err(err(format!(
                    "input {name}: both data and binary_data_size given"
                )))
            }
            (Some(n), None) => {
                if n > max_tensor_bytes {
                    return Err(err(format!(
                        "input {name}: {n} bytes exceed the limit of {max_tensor_bytes}"
                    )));
                }
                if n > binary.len() {
                    return Err(err(format!(
                        "input {name}: binary_data_size {n} runs past the body's end ({} bytes left)",
                        binary.len()
                    )));
                }
                let (mine, rest) = binary.split_at(n);
                binary = rest;
                mine.to_vec()
            }
            (None, Some(raw)) => {
                let mut out = Vec::new();
                let mut de = serde_json::Deserializer::from_str(raw.get());
                Flatten {
                    datatype,
                    out: &mut out,
                    max_bytes: max_tensor_bytes,
                    depth: 0,
                }
                .deserialize(&mut de)
                .map_err(|e| err(format!("input {name}: {e}")))?;
                out
            }
            (None, None) => return Err(err(format!("input {name}: no data"))),
        };
        let values = Values::new(datatype, bytes).map_err(|e| err(format!("input {name}: {e}")))?;
        inputs.push(HostTensor {
            name,
            shape: input.shape,
            values,
        });
    }
    if !binary.is_empty() {
        return Err(err(format!(
            "{} bytes of binary data follow the inputs unclaimed",
            binary.len()
        )));
    }
    let outputs = req
        .outputs
        .into_iter()
        .map(|o| {
            Ok(RequestedOutput {
                binary: bool_param(&o.parameters, "binary_data")?,
                name: o.name,
            })
        })
        .collect::<Result<Vec<_>, CodecError>>()?;
    Ok(InferRequest {
        id: req.id,
        inputs,
        outputs,
        binary_output: bool_param(&req.parameters, "binary_data_output")?.unwrap_or(false),
    })
}

/// Most nesting accepted in a JSON tensor.
const MAX_DEPTH: usize = 32;

/// Flattens a JSON tensor (nested arrays of numbers or booleans, row-major; of strings for
/// BYTES) into little-endian bytes of `datatype`, exactly: integers are never routed through
/// f64. BYTES elements go in KServe v2's binary form.
struct Flatten<'a> {
    datatype: DataType,
    out: &'a mut Vec<u8>,
    max_bytes: usize,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Flatten<'_> {
    fn push<E: serde::de::Error>(&mut self, n: Number) -> Result<(), E> {
        let Some(size) = self.datatype.size() else {
            return Err(E::custom(format!(
                "{n} is not a string (BYTES elements are)"
            )));
        };
        if self.out.len() + size > self.max_bytes {
            return Err(E::custom(format!(
                "more than the limit of {} bytes",
                self.max_bytes
            )));
        }
        encode(self.datatype, n, self.out).map_err(E::custom)
    }
}

/// A JSON scalar as it was written.
#[derive(Debug, Clone, Copy)]
enum Number {
    U(u64),
    I(i64),
    F(f64),
    B(bool),
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::U(v) => write!(f, "{v}"),
            Number::I(v) => write!(f, "{v}"),
            Number::F(v) => write!(f, "{v}"),
            Number::B(v) => write!(f, "{v}"),
        }
    }
}

/// Appends `n` as one little-endian element of `dt`, if it is one exactly (floats: any
/// number; integers: whole numbers in range; BOOL: true, false, 0 or 1).
fn encode(dt: DataType, n: Number, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let int = || -> Result<i128, CodecError> {
        match n {
            Number::U(v) => Ok(i128::from(v)),
            Number::I(v) => Ok(i128::from(v)),
            Number::F(v) if v.fract() == 0.0 && v.abs() < 1.8e19 => Ok(v as i128),
            Number::B(b) => Ok(i128::from(b)),
            Number::F(_) => Err(err(format!("{n} is not an integer"))),
        }
    };
    let float = || -> f64 {
        match n {
            Number::U(v) => v as f64,
            Number::I(v) => v as f64,
            Number::F(v) => v,
            Number::B(b) => f64::from(u8::from(b)),
        }
    };
    macro_rules! int_as {
        ($t:ty) => {{
            let v = int()?;
            let v = <$t>::try_from(v).map_err(|_| err(format!("{v} does not fit {dt}")))?;
            out.extend_from_slice(&v.to_le_bytes());
        }};
    }
    match dt {
        DataType::Bool => match int()? {
            v @ (0 | 1) => out.push(v as u8),
            v => return Err(err(format!("{v} is not a BOOL"))),
        },
        DataType::Uint8 => int_as!(u8),
        DataType::Uint16 => int_as!(u16),
        DataType::Uint32 => int_as!(u32),
        DataType::Uint64 => int_as!(u64),
        DataType::Int8 => int_as!(i8),
        DataType::Int16 => int_as!(i16),
        DataType::Int32 => int_as!(i32),
        DataType::Int64 => int_as!(i64),
        DataType::Fp16 => out.extend_from_slice(&half::f16::from_f64(float()).to_le_bytes()),
        DataType::Fp32 => out.extend_from_slice(&(float() as f32).to_le_bytes()),
        DataType::Fp64 => out.extend_from_slice(&float().to_le_bytes()),
        DataType::Bytes => return Err(err(format!("{n} is not a string"))),
    }
    Ok(())
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "nested arrays of {} values", self.datatype)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(serde::de::Error::custom("arrays nested too deep"));
        }
        while seq
            .next_element_seed(Flatten {
                datatype: self.datatype,
                out: &mut *self.out,
                max_bytes: self.max_bytes,
                depth: self.depth + 1,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_u64<E: serde::de::Error>(mut self, v: u64) -> Result<(), E> {
        self.push(Number::U(v))
    }

    fn visit_i64<E: serde::de::Error>(mut self, v: i64) -> Result<(), E> {
        self.push(Number::I(v))
    }

    fn visit_f64<E: serde::de::Error>(mut self, v: f64) -> Result<(), E> {
        self.push(Number::F(v))
    }

    fn visit_bool<E: serde::de::Error>(mut self, v: bool) -> Result<(), E> {
        self.push(Number::B(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        if self.datatype != DataType::Bytes {
            return Err(E::custom(format!(
                "a string is not a {} value",
                self.datatype
            )));
        }
        if self.out.len().saturating_add(4).saturating_add(v.len()) > self.max_bytes {
            return Err(E::custom(format!(
                "more than the limit of {} bytes",
                self.max_bytes
            )));
        }
        let len = u32::try_from(v.len()).map_err(|_| E::custom("a string too long"))?;
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out.extend_from_slice(v.as_bytes());
        Ok(())
    }
}

/// An output's data as JSON numbers of its own type.
#[derive(Serialize)]
#[serde(untagged)]
enum DataJson {
    Bool(Vec<bool>),
    U(Vec<u64>),
    I(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    S(Vec<String>),
}

fn data_json(values: &Values) -> DataJson {
    let dt = values.datatype();
    let chunks = values.bytes().chunks_exact(dt.size().unwrap_or(1));
    match dt {
        DataType::Bool => DataJson::Bool(chunks.map(|c| c[0] != 0).collect()),
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => {
            DataJson::U(chunks.map(|c| dt.decode_f64(c) as u64).collect())
        }
        DataType::Uint64 => DataJson::U(
            chunks
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
        ),
        DataType::Int8 | DataType::Int16 | DataType::Int32 => {
            DataJson::I(chunks.map(|c| dt.decode_f64(c) as i64).collect())
        }
        DataType::Int64 => DataJson::I(
            chunks
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
        ),
        DataType::Fp16 | DataType::Fp32 => {
            DataJson::F32(chunks.map(|c| dt.decode_f64(c) as f32).collect())
        }
        DataType::Fp64 => DataJson::F64(chunks.map(|c| dt.decode_f64(c)).collect()),
        // JSON strings are text: bytes that are not UTF-8 come back replaced (U+FFFD); binary
        // data carries them as they are. tract's strings are always UTF-8.
        DataType::Bytes => DataJson::S(
            values
                .strings()
                .into_iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect(),
        ),
    }
}

/// A tensor's elements as the JSON numbers this codec writes (exact integers, floats at their
/// own precision), for tools that print tensors as the device would.
pub fn data_value(values: &Values) -> Value {
    // Through text: `to_value` would widen each f32 to f64 and print its binary expansion.
    serde_json::to_vec(&data_json(values))
        .ok()
        .and_then(|text| serde_json::from_slice(&text).ok())
        .unwrap_or(Value::Null)
}

#[derive(Serialize)]
struct OutputJson<'a> {
    name: &'a str,
    datatype: DataType,
    shape: &'a [u64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BTreeMap<&'static str, usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<DataJson>,
}

#[derive(Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<OutputJson<'a>>,
}

/// An encoded response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// JSON header, then the binary outputs' bytes.
    pub body: Vec<u8>,
    /// The JSON header's length when binary outputs follow it.
    pub header_length: Option<usize>,
}

/// Picks the outputs a request asked for, in its order (all, in the model's order, when it
/// named none).
pub fn select_outputs<'a>(
    outputs: &'a [HostTensor],
    request: &InferRequest,
) -> Result<Vec<(&'a HostTensor, bool)>, CodecError> {
    if request.outputs.is_empty() {
        return Ok(outputs.iter().map(|o| (o, request.binary_output)).collect());
    }
    request
        .outputs
        .iter()
        .map(|want| {
            let o = outputs
                .iter()
                .find(|o| o.name == want.name)
                .ok_or_else(|| err(format!("unknown output {:?}", want.name)))?;
            Ok((o, want.binary.unwrap_or(request.binary_output)))
        })
        .collect()
}

/// Encodes the response to `request` from `outputs`. A floating-point output holding NaN or
/// an infinity cannot go as JSON (which has no such numbers; it would read `null`): that is
/// an error naming the output, and the client can ask for it as binary data instead.
pub fn encode_response(
    model_name: &str,
    model_version: u64,
    request: &InferRequest,
    outputs: &[(&HostTensor, bool)],
) -> Result<Response, CodecError> {
    for (o, as_binary) in outputs {
        let dt = o.values.datatype();
        if *as_binary || !matches!(dt, DataType::Fp16 | DataType::Fp32 | DataType::Fp64) {
            continue;
        }
        let values = o
            .values
            .bytes()
            .chunks_exact(dt.size().unwrap_or(1))
            .map(|c| dt.decode_f64(c));
        if let Some((i, v)) = values.enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(err(format!(
                "output {:?} holds a non-finite value ({v} at element {i}), which JSON cannot carry: ask for it as binary data (\"binary_data\": true)",
                o.name
            )));
        }
    }
    let mut binary = Vec::new();
    let json_outputs = outputs
        .iter()
        .map(|(o, as_binary)| {
            let (parameters, data) = if *as_binary {
                binary.extend_from_slice(o.values.bytes());
                (
                    Some(BTreeMap::from([(
                        "binary_data_size",
                        o.values.bytes().len(),
                    )])),
                    None,
                )
            } else {
                (None, Some(data_json(&o.values)))
            };
            OutputJson {
                name: &o.name,
                datatype: o.values.datatype(),
                shape: &o.shape,
                parameters,
                data,
            }
        })
        .collect();
    let header = ResponseJson {
        model_name,
        model_version: model_version.to_string(),
        id: request.id.as_deref(),
        outputs: json_outputs,
    };
    let mut body = serde_json::to_vec(&header).unwrap_or_default();
    let header_length =
        (!binary.is_empty() || outputs.iter().any(|(_, b)| *b)).then_some(body.len());
    body.extend_from_slice(&binary);
    Ok(Response {
        body,
        header_length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1 << 20;

    #[test]
    fn non_finite_outputs_go_binary_or_fail_by_name_never_as_null() {
        let r = parse_request(br#"{"inputs":[]}"#, None, MAX).unwrap();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let y = HostTensor {
                name: "y".into(),
                shape: vec![2],
                values: Values::from_f32(&[1.0, bad]),
            };
            let e = encode_response("m", 1, &r, &[(&y, false)]).unwrap_err();
            assert!(
                e.to_string().contains("\"y\" holds a non-finite value"),
                "{e}"
            );
            assert!(e.to_string().contains("element 1"), "{e}");
            // As binary data it is carried bit for bit.
            let ok = encode_response("m", 1, &r, &[(&y, true)]).unwrap();
            let n = ok.header_length.unwrap();
            assert_eq!(&ok.body[n..], y.values.bytes());
        }
    }

    #[test]
    fn parses_flat_and_nested_json() {
        let r = parse_request(
            br#"{"id":"7","inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[[1,2.5]]}]}"#,
            None,
            MAX,
        )
        .unwrap();
        assert_eq!(r.id.as_deref(), Some("7"));
        assert_eq!(r.inputs[0].values, Values::from_f32(&[1.0, 2.5]));
        assert!(r.outputs.is_empty() && !r.binary_output);
        for bad in [
            &br#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT64","data":[1.5]}]}"#[..],
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT8","data":[256]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"BOOL","data":[2]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":[1]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":["a"]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"STRING","data":["a"]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#,
            b"nope",
        ] {
            assert!(
                parse_request(bad, None, MAX).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn int64_is_exact_over_its_whole_range() {
        let body = format!(
            r#"{{"inputs":[{{"name":"x","shape":[3],"datatype":"INT64","data":[{},{},{}]}}]}}"#,
            (1i64 << 60) + 1,
            i64::MIN,
            i64::MAX
        );
        let r = parse_request(body.as_bytes(), None, MAX).unwrap();
        let want: Vec<u8> = [(1i64 << 60) + 1, i64::MIN, i64::MAX]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(r.inputs[0].values.bytes(), &want[..]);
        let outputs = [(&r.inputs[0], false)];
        let resp = encode_response("m", 1, &r, &outputs).unwrap();
        let text = String::from_utf8(resp.body).unwrap();
        assert!(text.contains("1152921504606846977"), "{text}");
        assert!(text.contains(&i64::MIN.to_string()), "{text}");
        let u = parse_request(
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT64","data":[18446744073709551615]}]}"#,
            None,
            MAX,
        )
        .unwrap();
        assert_eq!(u.inputs[0].values.bytes(), &u64::MAX.to_le_bytes());
    }

    #[test]
    fn binary_inputs_and_outputs() {
        let json = br#"{"id":"a","parameters":{"binary_data_output":true},"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}},{"name":"m","shape":[2],"datatype":"BOOL","data":[true,false]}],"outputs":[{"name":"y","parameters":{"binary_data":false}},{"name":"x"}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&1.5f32.to_le_bytes());
        body.extend_from_slice(&(-2f32).to_le_bytes());
        let r = parse_request(&body, Some(json.len()), MAX).unwrap();
        assert_eq!(r.inputs[0].values, Values::from_f32(&[1.5, -2.0]));
        assert_eq!(r.inputs[1].values.bytes(), &[1, 0]);
        assert!(r.binary_output);
        let y = HostTensor {
            name: "y".into(),
            shape: vec![1],
            values: Values::from_f32(&[0.25]),
        };
        let all = [r.inputs[0].clone(), y];
        let chosen = select_outputs(&all, &r).unwrap();
        assert_eq!(chosen[0].0.name, "y");
        assert!(!chosen[0].1 && chosen[1].1);
        let resp = encode_response("m", 3, &r, &chosen).unwrap();
        let n = resp.header_length.unwrap();
        let header: Value = serde_json::from_slice(&resp.body[..n]).unwrap();
        assert_eq!(header["id"], "a");
        assert_eq!(header["model_version"], "3");
        assert_eq!(header["outputs"][0]["data"][0], 0.25);
        assert_eq!(header["outputs"][1]["parameters"]["binary_data_size"], 8);
        assert_eq!(&resp.body[n..], &body[json.len()..]);
        // Asking for an output the model does not have is the client's error.
        let mut r2 = r.clone();
        r2.outputs.push(RequestedOutput {
            name: "zz".into(),
            binary: None,
        });
        assert!(select_outputs(&all, &r2).is_err());
    }

    #[test]
    fn binary_sizes_are_checked_against_the_body_and_the_limit() {
        let json = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&[0; 4]);
        assert!(parse_request(&body, Some(json.len()), MAX).is_err());
        body.extend_from_slice(&[0; 8]);
        assert!(
            parse_request(&body, Some(json.len()), MAX).is_err(),
            "unclaimed bytes"
        );
        body.truncate(json.len() + 8);
        assert!(
            parse_request(&body, Some(json.len()), 4).is_err(),
            "over the limit"
        );
        assert!(parse_request(&body, Some(body.len() + 1), MAX).is_err());
        assert!(parse_request(&body, Some(json.len()), MAX).is_ok());
        // A JSON tensor is bounded too.
        let big = br#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2,3]}]}"#;
        assert!(parse_request(big, None, 8).is_err());
        // BOOL bytes other than 0 and 1, and a ragged element, are refused.
        let b = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"BOOL","parameters":{"binary_data_size":1}}]}"#;
        let mut bb = b.to_vec();
        bb.push(7);
        assert!(parse_request(&bb, Some(b.len()), MAX).is_err());
        let f = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":3}}]}"#;
        let mut fb = f.to_vec();
        fb.extend_from_slice(&[0; 3]);
        assert!(parse_request(&fb, Some(f.len()), MAX).is_err());
    }

    #[test]
    fn bytes_travel_as_json_strings_and_as_length_prefixed_binary() {
        // JSON: strings in, strings out, nested as the shape says.
        let r = parse_request(
            r#"{"inputs":[{"name":"w","shape":[1,3],"datatype":"BYTES","data":[["fleet","","é"]]}]}"#
                .as_bytes(),
            None,
            MAX,
        )
        .unwrap();
        let v = &r.inputs[0].values;
        assert_eq!(v.len(), 3);
        assert_eq!(v.strings(), vec![&b"fleet"[..], b"", "é".as_bytes()]);
        assert_eq!(&v.bytes()[..9], &[5, 0, 0, 0, b'f', b'l', b'e', b'e', b't']);
        assert!(v.to_f64().is_empty());
        let resp = encode_response("m", 1, &r, &[(&r.inputs[0], false)]).unwrap();
        let out: Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(out["outputs"][0]["datatype"], "BYTES");
        assert_eq!(
            out["outputs"][0]["data"],
            serde_json::json!(["fleet", "", "é"])
        );
        // Binary: Triton's form (a u32 length before each element), both ways, as is.
        let json = br#"{"inputs":[{"name":"w","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":11}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&[2, 0, 0, 0, b'h', b'i', 1, 0, 0, 0, 0xff]);
        let r = parse_request(&body, Some(json.len()), MAX).unwrap();
        assert_eq!(r.inputs[0].values.strings(), vec![&b"hi"[..], &[0xff]]);
        let resp = encode_response("m", 1, &r, &[(&r.inputs[0], true)]).unwrap();
        let n = resp.header_length.unwrap();
        assert_eq!(&resp.body[n..], &body[json.len()..]);
        // As JSON, bytes that are not UTF-8 come back replaced, never as an error.
        let resp = encode_response("m", 1, &r, &[(&r.inputs[0], false)]).unwrap();
        let out: Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(
            out["outputs"][0]["data"],
            serde_json::json!(["hi", "\u{fffd}"])
        );
        // A length running past the data, or a torn length, is refused.
        for torn in [&[3u8, 0, 0, 0, b'a'][..], &[1, 0, 0]] {
            let json = format!(
                r#"{{"inputs":[{{"name":"w","shape":[1],"datatype":"BYTES","parameters":{{"binary_data_size":{}}}}}]}}"#,
                torn.len()
            );
            let mut body = json.as_bytes().to_vec();
            body.extend_from_slice(torn);
            assert!(
                parse_request(&body, Some(json.len()), MAX).is_err(),
                "{torn:?}"
            );
        }
        // JSON strings count against the limit with their lengths.
        let long = format!(
            r#"{{"inputs":[{{"name":"w","shape":[1],"datatype":"BYTES","data":["{}"]}}]}}"#,
            "x".repeat(61)
        );
        assert!(parse_request(long.as_bytes(), None, 64).is_err());
        assert!(parse_request(long.as_bytes(), None, 65).is_ok());
    }

    #[test]
    fn every_datatype_round_trips_through_json() {
        for dt in DataType::ALL.into_iter().filter(|d| *d != DataType::Bytes) {
            let body = format!(
                r#"{{"inputs":[{{"name":"x","shape":[2],"datatype":"{dt}","data":[1,0]}}]}}"#
            );
            let r = parse_request(body.as_bytes(), None, MAX).unwrap();
            assert_eq!(r.inputs[0].values.to_f64(), vec![1.0, 0.0], "{dt}");
            let outputs = [(&r.inputs[0], false)];
            let resp = encode_response("m", 1, &r, &outputs).unwrap();
            let v: Value = serde_json::from_slice(&resp.body).unwrap();
            assert_eq!(v["outputs"][0]["datatype"], dt.name());
            let again = format!(
                r#"{{"inputs":[{{"name":"x","shape":[2],"datatype":"{dt}","data":{}}}]}}"#,
                v["outputs"][0]["data"]
            );
            let r2 = parse_request(again.as_bytes(), None, MAX).unwrap();
            assert_eq!(r2.inputs[0].values, r.inputs[0].values, "{dt}");
        }
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), split in 0usize..300) {
            let _ = parse_request(&bytes, Some(split), MAX);
            let _ = parse_request(&bytes, None, 64);
        }
    }
}
