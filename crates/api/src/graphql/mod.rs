//! The GraphQL schema of docs/interfaces.md.
//!
//! - [`types`]: object types and their conversion from database rows.
//! - [`query`], [`mutation`], [`subscription`]: the root types.
//! - [`support`]: the support queue's queries and mutation, merged into the
//!   roots (docs/support-queue.md).
//! - [`request`]: [`RequestDb`], the one `observer_api` transaction a request
//!   runs in, and the resolvers' shorthands (`request_db`, `parse_id`).
//!
//! Dependencies point one way: the roots and [`types`] use [`request`];
//! [`subscription`] uses `crate::live`, which may use [`types`] but nothing
//! else here. [`Viewer`] lives in `crate::viewer`, below both.

pub mod mutation;
pub mod query;
pub mod request;
pub mod subscription;
pub mod support;
pub mod types;

use async_graphql::{MergedObject, Schema};

use crate::config::Limits;

pub use crate::viewer::Viewer;
pub use request::RequestDb;

/// `type Query`: the mirror's fields and the support queue's.
#[derive(MergedObject, Default)]
#[graphql(name = "Query")]
pub struct QueryRoot(query::Query, support::SupportQuery);

/// `type Mutation`.
#[derive(MergedObject, Default)]
#[graphql(name = "Mutation")]
pub struct MutationRoot(mutation::Mutation, support::SupportMutation);

pub type ObserverSchema = Schema<QueryRoot, MutationRoot, subscription::Subscription>;

/// Builds the schema with the configured depth and complexity limits.
pub fn build_schema(limits: &Limits) -> ObserverSchema {
    Schema::build(
        QueryRoot::default(),
        MutationRoot::default(),
        subscription::Subscription,
    )
    .limit_depth(limits.max_depth)
    .limit_complexity(limits.max_complexity)
    .limit_recursive_depth(limits.max_depth.saturating_mul(2).max(16))
    .limit_directives(16)
    .finish()
}

/// The SDL the code defines (checked in as `crates/api/schema.graphql`).
pub fn sdl() -> String {
    build_schema(&Limits::default()).sdl()
}
