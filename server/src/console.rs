//! The operator console: the single-page app built from `server/console/` (TypeScript, Preact,
//! uPlot; `bash server/console/build.sh`), embedded in the binary and served under
//! `/dashboard`. Public, as static files are: the page reads and acts only through the operator
//! API, with the token the operator gives it.

use std::sync::{Arc, OnceLock};

use axum::{
    extract::Path,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use sha2::{Digest, Sha256};

use crate::fleet::Fleet;

/// One file of the built console.
struct Asset {
    name: &'static str,
    mime: &'static str,
    body: &'static [u8],
}

const INDEX: Asset = Asset {
    name: "index.html",
    mime: "text/html; charset=utf-8",
    body: include_bytes!("../console/dist/index.html"),
};

const ASSETS: [Asset; 2] = [
    Asset {
        name: "console.js",
        mime: "text/javascript; charset=utf-8",
        body: include_bytes!("../console/dist/assets/console.js"),
    },
    Asset {
        name: "console.css",
        mime: "text/css; charset=utf-8",
        body: include_bytes!("../console/dist/assets/console.css"),
    },
];

/// What the page may load and who may frame it: itself only.
const CSP: &str =
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; \
                   object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

/// The console's routes: `/dashboard` and every page under it (the app routes them itself),
/// and its two assets.
pub fn router() -> Router<Arc<Fleet>> {
    Router::new()
        .route("/dashboard", get(index))
        .route("/dashboard/assets/{file}", get(asset))
        .route("/dashboard/{*page}", get(index))
}

async fn index(headers: HeaderMap) -> Response {
    serve(&INDEX, &headers)
}

async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == file) {
        Some(a) => serve(a, &headers),
        None => (StatusCode::NOT_FOUND, "no such file").into_response(),
    }
}

/// The asset, or 304 when the browser holds it already. Names are fixed (the binary is the
/// version), so browsers check each time (`no-cache`) and the entity tag saves the bytes.
fn serve(asset: &Asset, headers: &HeaderMap) -> Response {
    let tag = etag(asset);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.mime)], asset.body).into_response()
    };
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    if let Ok(v) = HeaderValue::from_str(tag) {
        h.insert(header::ETAG, v);
    }
    response
}

/// `"<first 16 hex of the file's SHA-256>"`, computed once per file.
fn etag(asset: &Asset) -> &'static str {
    static TAGS: OnceLock<Vec<(&'static str, String)>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        std::iter::once(&INDEX)
            .chain(ASSETS.iter())
            .map(|a| {
                let digest = hex::encode(Sha256::digest(a.body));
                (a.name, format!("\"{}\"", &digest[..16]))
            })
            .collect()
    });
    tags.iter()
        .find(|(n, _)| *n == asset.name)
        .map(|(_, t)| t.as_str())
        .unwrap_or("\"\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_console_is_embedded_and_names_its_assets() {
        let html = std::str::from_utf8(INDEX.body).unwrap();
        for a in &ASSETS {
            assert!(
                html.contains(&format!("/dashboard/assets/{}", a.name)),
                "index.html does not load {}: {html}",
                a.name
            );
            assert!(!a.body.is_empty());
        }
        assert_ne!(etag(&ASSETS[0]), etag(&ASSETS[1]));
    }

    #[test]
    fn a_browser_holding_the_asset_gets_not_modified() {
        let mut headers = HeaderMap::new();
        let first = serve(&ASSETS[0], &headers);
        assert_eq!(first.status(), StatusCode::OK);
        let tag = first.headers()[header::ETAG].clone();
        headers.insert(header::IF_NONE_MATCH, tag);
        assert_eq!(
            serve(&ASSETS[0], &headers).status(),
            StatusCode::NOT_MODIFIED
        );
    }
}
