//! `/docs`: a page rendering `/openapi.json` with a vendored, pinned Redoc
//! (`assets/`, see its README for the version, license and checksum). The
//! script is compiled in and served under a path naming its version, so it
//! is cached for a year; nothing is loaded from elsewhere.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, header};

macro_rules! redoc_version {
    () => {
        "2.5.0"
    };
}

/// The vendored Redoc release.
pub const REDOC_VERSION: &str = redoc_version!();

/// Where the page loads Redoc from.
pub const SCRIPT_PATH: &str = concat!("/docs/redoc-", redoc_version!(), ".standalone.js");

static SCRIPT: &[u8] = include_bytes!(concat!(
    "../assets/redoc-",
    redoc_version!(),
    ".standalone.js"
));

static PAGE: &str = concat!(
    "<!doctype html>\n",
    "<html lang=\"en\">\n",
    "<head>\n",
    "<meta charset=\"utf-8\">\n",
    "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
    "<title>Anumate REST API</title>\n",
    "</head>\n",
    "<body>\n",
    "<redoc spec-url=\"/openapi.json\"></redoc>\n",
    "<script src=\"/docs/redoc-",
    redoc_version!(),
    ".standalone.js\"></script>\n",
    "</body>\n",
    "</html>\n"
);

/// `GET /docs`: the page. Not cached, so a new release's script is picked up.
pub async fn page() -> Response {
    let mut resp = PAGE.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// `GET /docs/redoc-<version>.standalone.js`: the vendored script, cached
/// for a year (its path changes with its version).
pub async fn script() -> Response {
    let mut resp = SCRIPT.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}
