/// Errors at the database boundary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The row does not exist *or the current viewer may not see it*: the two are
    /// deliberately indistinguishable.
    #[error("not found")]
    NotFound,
    /// A uniqueness or check constraint rejected the write.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Input that the database layer refuses before sending it (bad cursor, too large).
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether a failed batch is worth retrying as is: connection trouble, a
    /// restarting server, resource exhaustion, serialization failures, deadlocks,
    /// lock timeouts and the lost races [`crate::ingest::write_batch`] reports as
    /// [`Error::Conflict`] (concurrent writers; nothing wrong with the data).
    /// Only the database refusing the data itself (bad values, a violated
    /// constraint, a statement it cannot run) is not: the batcher then isolates
    /// and drops the offending op, so misclassifying a race here would lose data.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Sqlx(sqlx::Error::Database(db)) => db.code().is_some_and(|c| {
                c.starts_with("08") // connection exception
                    || c.starts_with("57") // operator intervention (shutdown, cancel)
                    || c.starts_with("53") // insufficient resources
                    || c.starts_with("40") // serialization failure, deadlock
                    || c == "55P03" // lock not available
            }),
            // A row that failed to decode or a type the server does not know is a
            // bug or bad data: retrying the same batch cannot help.
            Error::Sqlx(
                sqlx::Error::ColumnDecode { .. }
                | sqlx::Error::ColumnNotFound(_)
                | sqlx::Error::ColumnIndexOutOfBounds { .. }
                | sqlx::Error::Decode(_)
                | sqlx::Error::Encode(_)
                | sqlx::Error::TypeNotFound { .. }
                | sqlx::Error::RowNotFound,
            ) => false,
            // I/O, TLS, protocol, pool timeouts and the like.
            Error::Sqlx(_) => true,
            Error::Conflict(_) => true,
            Error::NotFound | Error::Invalid(_) | Error::Migrate(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn lost_races_are_retried_and_refusals_are_not() {
        // write_messages reports concurrent-writer races as Conflict: the
        // batcher must retry those, not split the batch and drop ops.
        assert!(Error::Conflict("race".into()).is_transient());
        assert!(Error::Sqlx(sqlx::Error::PoolTimedOut).is_transient());
        assert!(!Error::Invalid("bad".into()).is_transient());
        assert!(!Error::Sqlx(sqlx::Error::RowNotFound).is_transient());
    }
}
