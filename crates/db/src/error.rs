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
