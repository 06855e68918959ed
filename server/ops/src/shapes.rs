//! Input shapes for publishing: the operator's `--input-shape` specs, and how each input's
//! symbolic dimensions become the bounded ranges a manifest carries. Pure: no files, no tract.
//!
//! A spec is `name=d,d,...` with one `d` per dimension: a size (`224`), a range (`1..8`), or
//! `?` (any size up to [`MAX_DIM`]); a range or `?` may say which size publishing checks and
//! golden vectors use (`32..1024@320`; otherwise the range's lower bound, and 1 for `?`).
//! Without a spec, a model's fixed dimensions stay fixed, a symbolic first dimension is taken
//! as the batch (`1..`[`DEFAULT_MAX_BATCH`]`@1`), and any other symbolic dimension must be
//! given. A symbol the model uses in several inputs gets one range for all of them.

use std::collections::BTreeMap;

use modelcast_proto::manifest::{Dim, DimRange, TensorSpec, MAX_DIM};
use thiserror::Error;

use crate::onnx::{OnnxDim, OnnxTensor};

/// A symbolic first dimension without a spec accepts batches of 1 to this.
pub const DEFAULT_MAX_BATCH: u64 = 8;

/// Why the shapes cannot be settled.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ShapeError {
    /// A spec does not parse.
    #[error("--input-shape {spec:?}: {why}")]
    Syntax {
        /// The spec as given.
        spec: String,
        /// What is wrong.
        why: String,
    },
    /// A spec does not fit the model.
    #[error("input {input:?}: {why}")]
    Mismatch {
        /// The input.
        input: String,
        /// What is wrong.
        why: String,
    },
}

/// One dimension of a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DimSpec {
    /// Exactly this size.
    Fixed(u64),
    /// From `min` to `max`, checked at `at`.
    Range {
        /// Smallest size.
        min: u64,
        /// Largest size.
        max: u64,
        /// The size publishing checks.
        at: u64,
    },
}

/// The operator's spec of one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeSpec {
    /// Input name.
    pub input: String,
    /// Its dimensions.
    pub dims: Vec<DimSpec>,
}

impl std::str::FromStr for ShapeSpec {
    type Err = ShapeError;

    fn from_str(spec: &str) -> Result<Self, ShapeError> {
        let syntax = |why: String| ShapeError::Syntax {
            spec: spec.into(),
            why,
        };
        // Input names may hold '=' rarely; the last one splits.
        let (input, dims) = spec
            .rsplit_once('=')
            .ok_or_else(|| syntax("expected name=d,d,... (e.g. x=1..8,3,224,224)".into()))?;
        if input.is_empty() {
            return Err(syntax("no input name".into()));
        }
        let number = |s: &str| -> Result<u64, ShapeError> {
            s.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=MAX_DIM).contains(n))
                .ok_or_else(|| syntax(format!("{s:?} is not a size from 1 to {MAX_DIM}")))
        };
        let dims = dims
            .split(',')
            .map(|d| {
                let (range, at) = match d.split_once('@') {
                    Some((r, a)) => (r.trim(), Some(number(a)?)),
                    None => (d.trim(), None),
                };
                let (min, max) = if range == "?" {
                    (1, MAX_DIM)
                } else if let Some((lo, hi)) = range.split_once("..") {
                    (number(lo)?, number(hi)?)
                } else {
                    if at.is_some() {
                        return Err(syntax(format!("{d:?}: only a range takes @")));
                    }
                    return Ok(DimSpec::Fixed(number(range)?));
                };
                let at = at.unwrap_or(min);
                if !(min <= at && at <= max) {
                    return Err(syntax(format!("{d:?}: need min <= @size <= max")));
                }
                Ok(DimSpec::Range { min, max, at })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ShapeSpec {
            input: input.into(),
            dims,
        })
    }
}

/// The manifest specs of a model's inputs: each dimension fixed, or a bounded range of the
/// model's symbol, as the specs say (see the module comment for the defaults).
pub fn resolve(inputs: &[OnnxTensor], specs: &[ShapeSpec]) -> Result<Vec<TensorSpec>, ShapeError> {
    for s in specs {
        if !inputs.iter().any(|i| i.name == s.input) {
            let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
            return Err(ShapeError::Mismatch {
                input: s.input.clone(),
                why: format!("the model has no such input (it has {names:?})"),
            });
        }
    }
    // First what the specs say of each symbol, then each input's dimensions.
    let mut symbols: BTreeMap<&str, DimSpec> = BTreeMap::new();
    for input in inputs {
        let Some(spec) = specs.iter().find(|s| s.input == input.name) else {
            continue;
        };
        let mismatch = |why: String| ShapeError::Mismatch {
            input: input.name.clone(),
            why,
        };
        if spec.dims.len() != input.dims.len() {
            return Err(mismatch(format!(
                "{} dimensions given, the model's input has {} ({})",
                spec.dims.len(),
                input.dims.len(),
                describe(&input.dims)
            )));
        }
        for (axis, (d, model)) in spec.dims.iter().zip(&input.dims).enumerate() {
            match model {
                OnnxDim::Fixed(f) => {
                    if *d != DimSpec::Fixed(*f) {
                        return Err(mismatch(format!(
                            "dimension {axis} is {f} in the model; it cannot be {d:?}"
                        )));
                    }
                }
                OnnxDim::Symbol(sym) => {
                    if let Some(prev) = symbols.insert(sym, *d) {
                        if prev != *d {
                            return Err(mismatch(format!(
                                "dimension {axis} ({sym}) is given as {d:?} here and {prev:?} for another input that shares it"
                            )));
                        }
                    }
                }
            }
        }
    }
    inputs
        .iter()
        .map(|input| {
            let mut shape = Vec::with_capacity(input.dims.len());
            let mut dims = Vec::with_capacity(input.dims.len());
            for (axis, model) in input.dims.iter().enumerate() {
                let d = match model {
                    OnnxDim::Fixed(f) => DimSpec::Fixed(*f),
                    OnnxDim::Symbol(sym) => match symbols.get(sym.as_str()) {
                        Some(d) => *d,
                        None if axis == 0 => DimSpec::Range {
                            min: 1,
                            max: DEFAULT_MAX_BATCH,
                            at: 1,
                        },
                        None => {
                            return Err(ShapeError::Mismatch {
                                input: input.name.clone(),
                                why: format!(
                                    "dimension {axis} ({sym}) of {} is symbolic: bound it, e.g. --input-shape {}={}",
                                    describe(&input.dims),
                                    input.name,
                                    example(&input.dims, axis)
                                ),
                            })
                        }
                    },
                };
                match (d, model) {
                    (DimSpec::Fixed(f), _) => {
                        shape.push(f);
                        dims.push(Dim::Fixed(f));
                    }
                    (DimSpec::Range { min, max, at }, OnnxDim::Symbol(sym)) => {
                        shape.push(at);
                        dims.push(Dim::Range(DimRange {
                            min,
                            max,
                            symbol: sym.clone(),
                        }));
                    }
                    (DimSpec::Range { .. }, OnnxDim::Fixed(_)) => unreachable!("checked above"),
                }
            }
            let dynamic = dims.iter().any(|d| !matches!(d, Dim::Fixed(_)));
            Ok(TensorSpec {
                name: input.name.clone(),
                datatype: input.datatype,
                shape,
                dims: if dynamic { dims } else { Vec::new() },
            })
        })
        .collect()
}

fn describe(dims: &[OnnxDim]) -> String {
    let d: Vec<String> = dims
        .iter()
        .map(|d| match d {
            OnnxDim::Fixed(f) => f.to_string(),
            OnnxDim::Symbol(s) => s.clone(),
        })
        .collect();
    format!("[{}]", d.join(", "))
}

/// A spec to suggest: fixed dimensions as they are, the batch `1..8`, others `1..1024@N`.
fn example(dims: &[OnnxDim], _axis: usize) -> String {
    let d: Vec<String> = dims
        .iter()
        .enumerate()
        .map(|(i, d)| match d {
            OnnxDim::Fixed(f) => f.to_string(),
            OnnxDim::Symbol(_) if i == 0 => format!("1..{DEFAULT_MAX_BATCH}"),
            OnnxDim::Symbol(_) => "1..1024@64".into(),
        })
        .collect();
    d.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcast_proto::manifest::DataType;

    fn input(name: &str, dims: &[&str]) -> OnnxTensor {
        OnnxTensor {
            name: name.into(),
            datatype: DataType::Fp32,
            dims: dims
                .iter()
                .map(|d| match d.parse::<u64>() {
                    Ok(n) => OnnxDim::Fixed(n),
                    Err(_) => OnnxDim::Symbol(d.to_string()),
                })
                .collect(),
        }
    }

    #[test]
    fn specs_parse() {
        let s: ShapeSpec = "x=1..8,3,48,32..1024@320".parse().unwrap();
        assert_eq!(s.input, "x");
        assert_eq!(
            s.dims,
            vec![
                DimSpec::Range {
                    min: 1,
                    max: 8,
                    at: 1
                },
                DimSpec::Fixed(3),
                DimSpec::Fixed(48),
                DimSpec::Range {
                    min: 32,
                    max: 1024,
                    at: 320
                },
            ]
        );
        let q: ShapeSpec = "gpu_0/data_0=1,3,48,?@64".parse().unwrap();
        assert_eq!(q.input, "gpu_0/data_0");
        assert_eq!(
            q.dims[3],
            DimSpec::Range {
                min: 1,
                max: MAX_DIM,
                at: 64
            }
        );
        for bad in [
            "x", "=1", "x=0", "x=a", "x=8..1", "x=1..8@9", "x=3@3", "x=1,,2",
        ] {
            assert!(bad.parse::<ShapeSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_symbolic_batch_defaults_and_other_symbols_must_be_given() {
        let inputs = [input("x", &["N", "3", "224", "224"])];
        let got = resolve(&inputs, &[]).unwrap();
        assert_eq!(got[0].shape, vec![1, 3, 224, 224]);
        assert_eq!(got[0].describe_shape(), "[1..8, 3, 224, 224]");
        let ocr = [input("x", &["N", "3", "48", "W"])];
        let err = resolve(&ocr, &[]).unwrap_err().to_string();
        assert!(
            err.contains("--input-shape x=1..8,3,48,1..1024@64"),
            "{err}"
        );
        let got = resolve(&ocr, &["x=1,3,48,32..1024@320".parse().unwrap()]).unwrap();
        assert_eq!(got[0].shape, vec![1, 3, 48, 320]);
        assert_eq!(got[0].describe_shape(), "[1, 3, 48, 32..1024]");
    }

    #[test]
    fn shared_symbols_get_one_range_and_specs_must_fit() {
        let inputs = [input("ids", &["B", "S"]), input("mask", &["B", "S"])];
        let got = resolve(&inputs, &["ids=1..4,1..128@16".parse().unwrap()]).unwrap();
        assert_eq!(got[1].shape, vec![1, 16]);
        assert_eq!(got[1].describe_shape(), "[1..4, 1..128]");
        let conflict = [
            "ids=1..4,1..128@16".parse().unwrap(),
            "mask=1..4,1..64@16".parse().unwrap(),
        ];
        assert!(resolve(&inputs, &conflict).is_err());
        assert!(resolve(&inputs, &["ids=1,2,3".parse().unwrap()]).is_err());
        assert!(resolve(&inputs, &["nope=1".parse().unwrap()]).is_err());
        let fixed = [input("x", &["1", "4"])];
        assert!(resolve(&fixed, &["x=1..2,4".parse().unwrap()]).is_err());
        let got = resolve(&fixed, &[]).unwrap();
        assert!(got[0].dims.is_empty() && got[0].shape == vec![1, 4]);
    }
}
