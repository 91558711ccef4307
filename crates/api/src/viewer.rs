//! Who is asking: the identity both the GraphQL schema and live fan-out
//! act for. It sits below both, so neither has to reach into the other for it.

/// Who is asking. Absent means anonymous: every field that reads data answers
/// `UNAUTHENTICATED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Viewer {
    pub user_id: i64,
}
