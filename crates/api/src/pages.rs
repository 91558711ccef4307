//! Pages served from the binary: the GraphQL query page at `GET /graphql` and
//! the placeholder dashboard at `/`. No CDN: every byte comes from here, and a
//! strict Content-Security-Policy keeps it that way.

use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

fn page(body: &'static str) -> Response {
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (CONTENT_SECURITY_POLICY, CSP),
        ],
        body,
    )
        .into_response()
}

/// The query page (a small self-contained GraphiQL-like editor).
pub async fn graphiql() -> Response {
    page(include_str!("../assets/graphiql.html"))
}

pub async fn graphiql_js() -> Response {
    (
        [
            (CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../assets/graphiql.js"),
    )
        .into_response()
}

pub async fn graphiql_css() -> Response {
    (
        [
            (CONTENT_TYPE, "text/css; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../assets/graphiql.css"),
    )
        .into_response()
}

/// Placeholder until the dashboard (web/) is served here.
pub async fn dashboard() -> Response {
    page(include_str!("../assets/index.html"))
}
