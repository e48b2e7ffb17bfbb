//! The web console at `/ui/`: plain HTML, CSS and JavaScript embedded in the binary
//! (no build step, nothing fetched from elsewhere). The page is a client of the
//! REST API ([`crate::rest`]) and nothing more: it keeps every instance from the
//! SSE watch (`/v1/registry/watch`, resumed with `Last-Event-ID`, replaced on
//! `reset`), polls `/v1/cluster/status` and `/v1/cluster/members`, and asks
//! `/v1/registry/leases` for the time the shown instances' leases have left.
//!
//! Assets are answered with an `ETag` and `Cache-Control: no-cache`: a browser keeps
//! them but revalidates each load (a `304` from the node it talks to anyway), so an
//! upgraded node never serves a page with a stale script. The page gets a strict
//! Content-Security-Policy (same-origin scripts, styles and connections only; no
//! inline code), a second line of defence behind the script's rule of rendering
//! user data as text only.

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The console page.
const INDEX_HTML: &str = include_str!("ui/index.html");
/// The console's script.
const APP_JS: &str = include_str!("ui/app.js");
/// The console's style sheet.
const STYLE_CSS: &str = include_str!("ui/style.css");

/// The page's Content-Security-Policy: everything from this node, nothing inline
/// (`data:` images only, for the empty favicon).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    /// Strong validator: a hash of the body, fixed at compile time.
    etag_hash: u64,
    /// Whether this is the HTML page (it gets the security headers).
    page: bool,
}

impl Asset {
    const fn new(body: &'static str, content_type: &'static str, page: bool) -> Self {
        Asset {
            body,
            content_type,
            etag_hash: fnv1a(body.as_bytes()),
            page,
        }
    }

    fn etag(&self) -> String {
        format!("\"{:016x}\"", self.etag_hash)
    }
}

const INDEX: Asset = Asset::new(INDEX_HTML, "text/html; charset=utf-8", true);
const APP: Asset = Asset::new(APP_JS, "text/javascript; charset=utf-8", false);
const STYLE: Asset = Asset::new(STYLE_CSS, "text/css; charset=utf-8", false);

/// 64-bit FNV-1a: a stable content hash computable in a `const` (not cryptographic;
/// it only has to change when the file does).
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

/// The console routes (merged into the HTTP router): `/ui/` and its two assets;
/// `/` and `/ui` redirect to `/ui/`. They need no node state, so they fit any
/// router state.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(to_console))
        .route("/ui", get(to_console))
        .route("/ui/", get(|headers: HeaderMap| async move { serve(&INDEX, &headers) }))
        .route(
            "/ui/index.html",
            get(|headers: HeaderMap| async move { serve(&INDEX, &headers) }),
        )
        .route(
            "/ui/app.js",
            get(|headers: HeaderMap| async move { serve(&APP, &headers) }),
        )
        .route(
            "/ui/style.css",
            get(|headers: HeaderMap| async move { serve(&STYLE, &headers) }),
        )
}

/// Redirects to the console. The page loads its assets and calls the API by
/// relative URLs, so it needs the trailing slash; the `Location` is relative too
/// (`/ui` → `ui/`, `/` → `ui/`), which keeps working behind a path-prefixing proxy.
async fn to_console() -> Response {
    (
        StatusCode::TEMPORARY_REDIRECT,
        [(header::LOCATION, "ui/"), (header::CACHE_CONTROL, "no-cache")],
    )
        .into_response()
}

/// Whether `If-None-Match` names `etag` (or is `*`).
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == etag || tag == "*")
}

/// Answers an asset, or `304 Not Modified` when the browser's copy is current.
fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let etag = asset.etag();
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    if asset.page {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
        headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        headers.insert(
            HeaderName::from_static("x-frame-options"),
            HeaderValue::from_static("DENY"),
        );
    }
    if not_modified(request, &etag) {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    (headers, asset.body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str, if_none_match: Option<&str>) -> Response {
        let mut request = Request::get(path);
        if let Some(tag) = if_none_match {
            request = request.header(header::IF_NONE_MATCH, tag);
        }
        routes::<()>()
            .oneshot(request.body(Body::empty()).expect("a request"))
            .await
            .expect("infallible")
    }

    fn header_of(response: &Response, name: HeaderName) -> &str {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn each_asset_is_served_with_its_content_type_and_a_revalidating_cache_policy() {
        for (path, content_type) in [
            ("/ui/", "text/html; charset=utf-8"),
            ("/ui/app.js", "text/javascript; charset=utf-8"),
            ("/ui/style.css", "text/css; charset=utf-8"),
        ] {
            let response = get(path, None).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_eq!(header_of(&response, header::CONTENT_TYPE), content_type, "{path}");
            assert_eq!(header_of(&response, header::CACHE_CONTROL), "no-cache", "{path}");
            assert_eq!(header_of(&response, header::X_CONTENT_TYPE_OPTIONS), "nosniff");
            assert!(header_of(&response, header::ETAG).starts_with('"'), "{path}");
        }
        let page = get("/ui/", None).await;
        assert!(header_of(&page, header::CONTENT_SECURITY_POLICY).contains("script-src 'self'"));
    }

    #[tokio::test]
    async fn a_current_etag_gets_304_and_a_stale_one_the_body() {
        let etag = APP.etag();
        let response = get("/ui/app.js", Some(&etag)).await;
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(header_of(&response, header::ETAG), etag);
        let response = get("/ui/app.js", Some("\"0000000000000000\"")).await;
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn the_root_and_ui_without_slash_redirect_to_the_console() {
        for path in ["/", "/ui"] {
            let response = get(path, None).await;
            assert_eq!(response.status(), StatusCode::TEMPORARY_REDIRECT, "{path}");
            assert_eq!(header_of(&response, header::LOCATION), "ui/", "{path}");
        }
    }

    #[test]
    fn the_page_loads_only_embedded_assets_and_no_inline_code() {
        assert!(INDEX_HTML.contains(r#"src="app.js""#));
        assert!(INDEX_HTML.contains(r#"href="style.css""#));
        for forbidden in ["http://", "https://", "<script>", " style=", " onclick="] {
            assert!(!INDEX_HTML.contains(forbidden), "index.html contains {forbidden:?}");
        }
        // User data reaches the DOM only as text.
        assert!(!APP_JS.contains("innerHTML"));
        assert!(!APP_JS.contains("outerHTML"));
        assert!(!APP_JS.contains("insertAdjacentHTML"));
    }
}
