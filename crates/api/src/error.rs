//! GraphQL error codes (`extensions.code`) and the mapping from internal errors.
//!
//! Clients see a code and a short message. Internal causes are logged with
//! their chain and replaced by a generic message, so nothing about the
//! database or other tenants leaks through an error.

use async_graphql::ErrorExtensions;

/// Declares [`Code`] and its wire strings in one list, so [`Code::ALL`] cannot
/// miss a variant (the README test iterates it).
macro_rules! codes {
    ($($(#[$doc:meta])* $variant:ident => $wire:literal,)+) => {
        /// The fixed set of `extensions.code` values (docs/interfaces.md); each one is
        /// documented in the crate README's error table.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Code {
            $($(#[$doc])* $variant,)+
        }

        impl Code {
            /// Every code, in declaration order.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)+];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => $wire,)+
                }
            }
        }
    };
}

codes! {
    /// No (valid) credential for something that needs one; also a revoked
    /// session or token ending a live subscription.
    Unauthenticated => "UNAUTHENTICATED",
    /// Authenticated, but nothing in scope is visible (live subscriptions).
    Forbidden => "FORBIDDEN",
    /// Hidden or nonexistent id (the two answer identically).
    NotFound => "NOT_FOUND",
    /// The client's request is wrong: parse, validation, depth, complexity, body size.
    BadRequest => "BAD_REQUEST",
    /// A per-address or per-viewer token bucket is empty.
    RateLimited => "RATE_LIMITED",
    /// A server-side failure (cause logged, never shown) or a request timeout.
    Internal => "INTERNAL",
    /// A live subscription whose buffer overflowed; `extensions.lastCursor`
    /// says where to resume.
    SlowConsumer => "SLOW_CONSUMER",
    /// Live events cannot be served right now (e.g. the database LISTEN is
    /// down); resume from `extensions.lastCursor` when present.
    Unavailable => "UNAVAILABLE",
    /// The connection or the viewer already has as many subscriptions open as allowed.
    TooManySubscriptions => "TOO_MANY_SUBSCRIPTIONS",
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Builds a GraphQL error carrying `code`.
pub fn gql_error(code: Code, message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message.into()).extend_with(|_, e| e.set("code", code.as_str()))
}

pub fn unauthenticated() -> async_graphql::Error {
    gql_error(Code::Unauthenticated, "not authenticated")
}

pub fn not_found() -> async_graphql::Error {
    gql_error(Code::NotFound, "not found")
}

pub fn bad_request(message: impl Into<String>) -> async_graphql::Error {
    gql_error(Code::BadRequest, message)
}

/// Logs an internal failure with its whole cause chain and returns the opaque
/// error the client sees.
pub fn internal(err: &(dyn std::error::Error + 'static)) -> async_graphql::Error {
    tracing::error!(error = %error_chain(err), "internal error while serving GraphQL");
    gql_error(Code::Internal, "internal error")
}

/// An error and all its sources, `: `-separated, for logs.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
    chain
}

/// Maps a database error: "not found" stays not found, bad input is the
/// client's fault, the rest is internal.
pub fn from_db(err: observer_db::Error) -> async_graphql::Error {
    match err {
        observer_db::Error::NotFound => not_found(),
        observer_db::Error::Invalid(m) => bad_request(m),
        other => internal(&other),
    }
}

/// `Result` alias for resolvers.
pub type GqlResult<T> = Result<T, async_graphql::Error>;

/// Gives every error in a response an `extensions.code`: parse, validation and
/// limit errors produced by async-graphql itself carry none, and they are all
/// the client's fault.
pub fn ensure_codes(resp: &mut async_graphql::Response) {
    for err in &mut resp.errors {
        let has_code = err
            .extensions
            .as_ref()
            .is_some_and(|ext| ext.get("code").is_some());
        if !has_code {
            err.extensions
                .get_or_insert_with(Default::default)
                .set("code", Code::BadRequest.as_str());
        }
    }
}

/// A one-error GraphQL response (for failures before execution).
pub fn error_response(code: Code, message: &str) -> async_graphql::Response {
    let mut err = async_graphql::ServerError::new(message, None);
    let mut ext = async_graphql::ErrorExtensionValues::default();
    ext.set("code", code.as_str());
    err.extensions = Some(ext);
    async_graphql::Response::from_errors(vec![err])
}
