//! Pages served from the binary: GraphiQL at `GET /graphql` (vendored from npm,
//! see `assets/graphiql/README.md`) and the dashboard at `/` (plain ES modules
//! from `web/`). No CDN: every byte comes from here, and a Content-Security-Policy
//! without inline scripts keeps it that way. `X-Content-Type-Options` and
//! `Referrer-Policy` come from the layers every route has (`http::outer_layers`).

use axum::extract::Path;
use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// The dashboard's policy: only our own scripts, styles and endpoints (the
/// WebSocket included: CSP 3 `'self'` covers ws/wss to the same host).
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

/// GraphiQL's policy. Scripts stay `'self'` only (the bundle needs no eval);
/// styles need `'unsafe-inline'` because GraphiQL's Radix UI dialogs and
/// CodeMirror 5 inject `<style>` elements and style attributes at runtime. Its
/// CSS embeds fonts and a few images as data: URIs.
const GRAPHIQL_CSP: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; font-src data:; img-src 'self' data:; connect-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Versioned vendor files never change under one URL: cache them for a year.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// Our own files change with each release and keep their names: revalidate.
const REVALIDATE: &str = "no-cache";

fn page(body: &'static str, csp: &'static str) -> Response {
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (CONTENT_SECURITY_POLICY, csp),
            (CACHE_CONTROL, REVALIDATE),
        ],
        body,
    )
        .into_response()
}

/// GraphiQL (the browser side of `GET /graphql`).
pub async fn graphiql() -> Response {
    page(include_str!("../assets/graphiql.html"), GRAPHIQL_CSP)
}

/// The dashboard at `/`.
pub async fn dashboard() -> Response {
    page(include_str!("../../../web/index.html"), DASHBOARD_CSP)
}

struct Asset {
    path: &'static str,
    content_type: &'static str,
    cache: &'static str,
    body: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

const ASSETS: &[Asset] = &[
    Asset {
        path: "graphiql/graphiql-4.1.2.min.js",
        content_type: JS,
        cache: IMMUTABLE,
        body: include_bytes!("../assets/graphiql/graphiql-4.1.2.min.js"),
    },
    Asset {
        path: "graphiql/graphiql-4.1.2.min.css",
        content_type: CSS,
        cache: IMMUTABLE,
        body: include_bytes!("../assets/graphiql/graphiql-4.1.2.min.css"),
    },
    Asset {
        path: "graphiql/react-18.3.1.production.min.js",
        content_type: JS,
        cache: IMMUTABLE,
        body: include_bytes!("../assets/graphiql/react-18.3.1.production.min.js"),
    },
    Asset {
        path: "graphiql/react-dom-18.3.1.production.min.js",
        content_type: JS,
        cache: IMMUTABLE,
        body: include_bytes!("../assets/graphiql/react-dom-18.3.1.production.min.js"),
    },
    Asset {
        path: "graphiql-init.js",
        content_type: JS,
        cache: REVALIDATE,
        body: include_bytes!("../assets/graphiql-init.js"),
    },
    Asset {
        path: "graphiql-page.css",
        content_type: CSS,
        cache: REVALIDATE,
        body: include_bytes!("../assets/graphiql-page.css"),
    },
    Asset {
        path: "app.js",
        content_type: JS,
        cache: REVALIDATE,
        body: include_bytes!("../../../web/app.js"),
    },
    Asset {
        path: "gqlws.js",
        content_type: JS,
        cache: REVALIDATE,
        body: include_bytes!("../../../web/gqlws.js"),
    },
    Asset {
        path: "style.css",
        content_type: CSS,
        cache: REVALIDATE,
        body: include_bytes!("../../../web/style.css"),
    },
];

/// `GET /assets/{*path}`: one of the embedded files above, else 404.
pub async fn asset(Path(path): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.path == path) {
        Some(a) => (
            [(CONTENT_TYPE, a.content_type), (CACHE_CONTROL, a.cache)],
            a.body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}
