//! Where an artifact's tensors lie, so that its chunks can start at them
//! ([`modelcast_proto::manifest::Manifest::segments`]): each entry of an NNEF tar, each
//! initializer's data in an ONNX protobuf. A tensor that did not change between two versions
//! then has byte-identical chunks, which a device copies from the version it holds instead
//! of downloading them, whatever changed size before it (another tensor, the graph, the
//! metadata).

use modelcast_proto::manifest::{segments_at, ModelFormat};

/// The least tensor worth chunks of its own: smaller ones travel in the chunks of what
/// precedes them (a chunk per bias vector would cost more requests than it saves bytes).
pub const MIN_SEGMENT: u64 = 16 * 1024;

/// The segment offsets of `artifact`, in `format`: none if its structure cannot be read
/// (the artifact is then chunked from its start alone, which is always valid).
pub fn segments(format: ModelFormat, artifact: &[u8]) -> Vec<u64> {
    let tensors = match format {
        ModelFormat::Nnef => tar_entries(artifact),
        ModelFormat::Onnx => onnx_tensors(artifact),
    };
    match tensors {
        Ok(t) => segments_at(artifact.len() as u64, &t, MIN_SEGMENT),
        Err(_) => Vec::new(),
    }
}

/// Why an artifact's layout could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// The tar does not read.
    #[error("tar: {0}")]
    Tar(String),
    /// The protobuf does not read.
    #[error("protobuf: {what} at byte {at}")]
    Protobuf {
        /// What is wrong.
        what: &'static str,
        /// Where.
        at: usize,
    },
}

/// (offset of its header, its size) for every entry of a tar.
pub fn tar_entries(artifact: &[u8]) -> Result<Vec<(u64, u64)>, LayoutError> {
    let tar_err = |e: std::io::Error| LayoutError::Tar(e.to_string());
    let mut archive = tar::Archive::new(std::io::Cursor::new(artifact));
    let mut out = Vec::new();
    for entry in archive.entries_with_seek().map_err(tar_err)? {
        let entry = entry.map_err(tar_err)?;
        out.push((entry.raw_header_position(), entry.size()));
    }
    Ok(out)
}

/// (offset, length) of the data of every tensor an ONNX model carries: its graph's
/// initializers (`raw_data`, or packed `float_data`/`int64_data`…) and the tensors of its
/// `Constant` nodes.
pub fn onnx_tensors(model: &[u8]) -> Result<Vec<(u64, u64)>, LayoutError> {
    let mut out = Vec::new();
    for field in Fields::new(model, 0) {
        let field = field?;
        // ModelProto.graph = 7
        if field.number == 7 && field.is_bytes() {
            graph(model, field, &mut out)?;
        }
    }
    Ok(out)
}

fn graph(model: &[u8], g: Field, out: &mut Vec<(u64, u64)>) -> Result<(), LayoutError> {
    for field in Fields::new(&model[..g.end], g.start) {
        let field = field?;
        match field.number {
            // GraphProto.initializer = 5
            5 if field.is_bytes() => tensor(model, field, out)?,
            // GraphProto.node = 1: a Constant's value is its attribute's tensor.
            1 if field.is_bytes() => {
                for attr in Fields::new(&model[..field.end], field.start) {
                    let attr = attr?;
                    // NodeProto.attribute = 5
                    if attr.number != 5 || !attr.is_bytes() {
                        continue;
                    }
                    for value in Fields::new(&model[..attr.end], attr.start) {
                        let value = value?;
                        // AttributeProto.t = 5
                        if value.number == 5 && value.is_bytes() {
                            tensor(model, value, out)?;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn tensor(model: &[u8], t: Field, out: &mut Vec<(u64, u64)>) -> Result<(), LayoutError> {
    for field in Fields::new(&model[..t.end], t.start) {
        let field = field?;
        // TensorProto: float_data 4, int32_data 5, string_data 6, int64_data 7, raw_data 9,
        // double_data 10, uint64_data 11 (packed when large).
        if matches!(field.number, 4 | 5 | 7 | 9 | 10 | 11) && field.is_bytes() {
            out.push((field.start as u64, (field.end - field.start) as u64));
        }
    }
    Ok(())
}

/// One field of a protobuf message: its number, wire type, and for a length-delimited one
/// the range of its bytes.
#[derive(Debug, Clone, Copy)]
struct Field {
    number: u64,
    wire: u8,
    start: usize,
    end: usize,
}

impl Field {
    fn is_bytes(&self) -> bool {
        self.wire == 2
    }
}

/// The fields of the message in `buf[at..]`, each read with its bounds checked.
struct Fields<'a> {
    buf: &'a [u8],
    at: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8], at: usize) -> Self {
        Fields {
            buf,
            at,
            failed: false,
        }
    }

    fn varint(&mut self) -> Result<u64, LayoutError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.buf.get(self.at) else {
                return Err(self.err("a varint runs past the end"));
            };
            self.at += 1;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.err("a varint over ten bytes"))
    }

    fn skip(&mut self, n: u64) -> Result<usize, LayoutError> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| self.err("a field runs past its message"))?;
        let start = self.at;
        self.at = end;
        Ok(start)
    }

    fn err(&self, what: &'static str) -> LayoutError {
        LayoutError::Protobuf { what, at: self.at }
    }

    fn field(&mut self) -> Result<Field, LayoutError> {
        let key = self.varint()?;
        let (number, wire) = (key >> 3, (key & 7) as u8);
        let (start, end) = match wire {
            0 => {
                self.varint()?;
                (self.at, self.at)
            }
            1 => (self.skip(8)?, self.at),
            2 => {
                let len = self.varint()?;
                (self.skip(len)?, self.at)
            }
            5 => (self.skip(4)?, self.at),
            _ => return Err(self.err("an unknown wire type")),
        };
        Ok(Field {
            number,
            wire,
            start,
            end,
        })
    }
}

impl Iterator for Fields<'_> {
    type Item = Result<Field, LayoutError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.at >= self.buf.len() {
            return None;
        }
        let field = self.field();
        self.failed = field.is_err();
        Some(field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_onnx_models_initializers_are_found_where_they_lie() {
        let model = crate::onnx::example_model_of_size(1, 12 << 20);
        let tensors = onnx_tensors(&model).unwrap();
        let big: Vec<_> = tensors.iter().filter(|t| t.1 >= MIN_SEGMENT).collect();
        assert!(big.len() >= 3, "{tensors:?}");
        // Each is the raw bytes of one weight matrix: the file's bytes there are its floats.
        let total: u64 = tensors.iter().map(|t| t.1).sum();
        assert!(total > model.len() as u64 * 9 / 10, "{total}");
        for &(start, len) in &tensors {
            assert!(start + len <= model.len() as u64);
        }
        let segs = segments(ModelFormat::Onnx, &model);
        assert_eq!(segs.len(), big.len());
    }

    #[test]
    fn an_nnef_tars_entries_are_found() {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, len) in [("graph.nnef", 100usize), ("w.dat", 40_000), ("b.dat", 10)] {
            let mut h = tar::Header::new_gnu();
            h.set_size(len as u64);
            h.set_mode(0o644);
            h.set_cksum();
            builder
                .append_data(&mut h, name, &vec![1u8; len][..])
                .unwrap();
        }
        let tar = builder.into_inner().unwrap();
        let entries = tar_entries(&tar).unwrap();
        assert_eq!(
            entries,
            vec![(0, 100), (1024, 40_000), (1024 + 512 + 40_448, 10)]
        );
        assert_eq!(segments(ModelFormat::Nnef, &tar), vec![1024]);
    }

    #[test]
    fn what_does_not_read_gets_no_segments() {
        assert_eq!(
            segments(ModelFormat::Onnx, b"\x3a\xff\xff\xff\x0f"),
            Vec::<u64>::new()
        );
        assert!(onnx_tensors(b"\x3a\x05ab").is_err());
        assert!(tar_entries(&[7u8; 700]).is_err());
    }

    proptest! {
        #[test]
        fn the_protobuf_walk_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = onnx_tensors(&bytes);
            let _ = segments(ModelFormat::Nnef, &bytes);
        }
    }
}
