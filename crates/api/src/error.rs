//! GraphQL error codes (`extensions.code`) and the mapping from internal errors.
//!
//! Clients see a code and a short message. Internal causes are logged with
//! their chain and replaced by a generic message, so nothing about the
//! database or other tenants leaks through an error.

use async_graphql::ErrorExtensions;

/// The fixed set of `extensions.code` values (DESIGN.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Unauthenticated,
    Forbidden,
    NotFound,
    BadRequest,
    RateLimited,
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Unauthenticated => "UNAUTHENTICATED",
            Code::Forbidden => "FORBIDDEN",
            Code::NotFound => "NOT_FOUND",
            Code::BadRequest => "BAD_REQUEST",
            Code::RateLimited => "RATE_LIMITED",
            Code::Internal => "INTERNAL",
        }
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
