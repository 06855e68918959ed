//! Every stored file (artifact or golden file) over HTTP by its SHA-256: `GET /files/{sha256}`,
//! with single byte ranges (`Range: bytes=A-B`, `A-`, `-N`) answered `206` from the chunks
//! that cover them, so devices whose deployment says `http` fetch chunk ranges here instead of
//! over MQTT. Public, like a static host or CDN serving the same files: a file is named by its
//! digest and every chunk is checked against the signed manifest on the device.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use modelcast_proto::chunk::parse_digest;
use modelcast_proto::manifest::spans;

use crate::fleet::Fleet;

/// The bytes a request asks for: `start..end` of a file of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// Why a `Range` header cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Not `bytes=A-B`, `bytes=A-` or `bytes=-N`, or more than one range.
    #[error("only one byte range (bytes=A-B, A- or -N) is served")]
    Unsupported,
    /// Past the end of the file, or empty.
    #[error("the range is outside the file")]
    Unsatisfiable,
}

/// The range `header` asks of a file of `size` bytes (RFC 9110 §14.1.2).
pub fn parse_range(header: &str, size: u64) -> Result<ByteRange, RangeError> {
    let spec = header
        .trim()
        .strip_prefix("bytes=")
        .ok_or(RangeError::Unsupported)?;
    if spec.contains(',') {
        return Err(RangeError::Unsupported);
    }
    let (first, last) = spec.trim().split_once('-').ok_or(RangeError::Unsupported)?;
    let number = |s: &str| -> Result<u64, RangeError> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RangeError::Unsupported);
        }
        s.parse().map_err(|_| RangeError::Unsupported)
    };
    let range = match (first.trim(), last.trim()) {
        ("", suffix) => {
            let n = number(suffix)?.min(size);
            ByteRange {
                start: size - n,
                end: size,
            }
        }
        (start, "") => ByteRange {
            start: number(start)?,
            end: size,
        },
        (start, last) => {
            let (start, last) = (number(start)?, number(last)?);
            if last < start {
                return Err(RangeError::Unsupported);
            }
            ByteRange {
                start,
                end: last.saturating_add(1).min(size),
            }
        }
    };
    if range.start >= range.end {
        return Err(RangeError::Unsatisfiable);
    }
    Ok(range)
}

/// `GET` or `HEAD /files/{sha256}`.
pub async fn file(
    State(fleet): State<Arc<Fleet>>,
    Path(sha256): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let not_found = || (StatusCode::NOT_FOUND, "no such file").into_response();
    let Ok(digest) = parse_digest(&sha256) else {
        return not_found();
    };
    let info = match fleet.db().artifact(&digest).await {
        Ok(Some(info)) => info,
        Ok(None) => return not_found(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let size = info.size;
    let asked = headers.get(header::RANGE).map(|v| {
        v.to_str()
            .map_err(|_| RangeError::Unsupported)
            .and_then(|h| parse_range(h, size))
    });
    let (status, range) = match asked {
        None => (
            StatusCode::OK,
            ByteRange {
                start: 0,
                end: size,
            },
        ),
        Some(Ok(r)) => (StatusCode::PARTIAL_CONTENT, r),
        Some(Err(e)) => {
            let mut r = (StatusCode::RANGE_NOT_SATISFIABLE, e.to_string()).into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let mut out = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, range.end - range.start)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{}\"", sha256.to_ascii_lowercase()))
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable");
    if status == StatusCode::PARTIAL_CONTENT {
        out = out.header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{size}", range.start, range.end - 1),
        );
    }
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        // The chunks that cover the range, read one at a time as the body is sent.
        let pieces: Vec<(u32, u64, u64)> = spans(size, info.chunk_size, &info.segments)
            .enumerate()
            .filter_map(|(i, s)| {
                let (from, to) = (s.offset, s.offset + u64::from(s.len));
                let (a, b) = (from.max(range.start), to.min(range.end));
                (a < b).then(|| (i as u32, a - from, b - from))
            })
            .collect();
        let stream = futures_util::stream::unfold(
            (fleet, pieces.into_iter()),
            move |(fleet, mut pieces)| async move {
                let (index, a, b) = pieces.next()?;
                let chunk = match fleet.db().chunk(&digest, index).await {
                    Ok(Some(c)) if c.len() as u64 >= b => Ok(c.slice(a as usize..b as usize)),
                    Ok(_) => Err(std::io::Error::other(format!("chunk {index} is missing"))),
                    Err(e) => Err(std::io::Error::other(e.to_string())),
                };
                // A read that failed ends the body short: the client sees a broken transfer,
                // never wrong bytes.
                let next = if chunk.is_ok() {
                    pieces
                } else {
                    Default::default()
                };
                Some((chunk, (fleet, next)))
            },
        );
        Body::from_stream(stream)
    };
    out.body(body)
        .unwrap_or_else(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_are_read_as_rfc_9110_says() {
        let r = |start, end| Ok(ByteRange { start, end });
        assert_eq!(parse_range("bytes=0-99", 1000), r(0, 100));
        assert_eq!(parse_range("bytes=990-2000", 1000), r(990, 1000));
        assert_eq!(parse_range("bytes=500-", 1000), r(500, 1000));
        assert_eq!(parse_range("bytes=-10", 1000), r(990, 1000));
        assert_eq!(parse_range("bytes=-5000", 1000), r(0, 1000));
        assert_eq!(parse_range(" bytes= 3-4 ", 1000), r(3, 5));
        for bad in [
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=5-1",
            "bytes=a-b",
            "bytes=-",
            "0-1",
        ] {
            assert_eq!(
                parse_range(bad, 1000),
                Err(RangeError::Unsupported),
                "{bad}"
            );
        }
        assert_eq!(
            parse_range("bytes=1000-", 1000),
            Err(RangeError::Unsatisfiable)
        );
        assert_eq!(
            parse_range("bytes=-0", 1000),
            Err(RangeError::Unsatisfiable)
        );
    }

    proptest! {
        #[test]
        fn a_range_header_never_panics_and_stays_in_the_file(header in ".{0,40}", size in 0u64..u64::MAX) {
            if let Ok(r) = parse_range(&header, size) {
                prop_assert!(r.start < r.end && r.end <= size);
            }
        }
    }
}
