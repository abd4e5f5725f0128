//! The error a handler returns, which carries how the failure is to be treated.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;

/// How a failed message is to be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A transient failure (lost connection, deadlock, an external service down): try again later.
    Retryable,
    /// The message can never succeed (a constraint it breaks, data it lacks): dead-letter it.
    Permanent,
    /// Set the message aside in the parking lot for a person to look at; not an error of the data.
    Park,
}

impl ErrorKind {
    /// `retryable`, `permanent` or `park`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Retryable => "retryable",
            ErrorKind::Permanent => "permanent",
            ErrorKind::Park => "park",
        }
    }
}

/// The error a handler returns. Its [`ErrorKind`] says what happens to the message, so nothing
/// downstream has to guess from the error's type.
///
/// ```
/// use oncely_core::{ErrorKind, HandlerError};
///
/// let e = HandlerError::permanent("unknown_currency", "currency XTS is not billed");
/// assert_eq!(e.kind(), ErrorKind::Permanent);
/// assert_eq!(e.code(), "unknown_currency");
/// ```
pub struct HandlerError {
    kind: ErrorKind,
    code: Cow<'static, str>,
    message: String,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl HandlerError {
    /// A failure of the given kind.
    pub fn new(
        kind: ErrorKind,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        HandlerError {
            kind,
            code: code.into(),
            message: message.into(),
            source: None,
        }
    }

    /// A transient failure: the message is retried through the delay queues.
    pub fn retryable(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Retryable, code, message)
    }

    /// A failure retrying cannot fix: the message is dead-lettered.
    pub fn permanent(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Permanent, code, message)
    }

    /// The message is set aside in the parking lot.
    pub fn park(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Park, code, message)
    }

    /// Attaches the underlying error (kept for logs and `Error::source`).
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// How the message is to be treated.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Machine-readable code, written to the `x-oncely-error-code` header and the inbox.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// Human-readable text.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("code", &self.code)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

/// Codes of database errors that come from the deployment, not from the message: a table,
/// column or function the code expects but the schema lacks (a service started before its
/// migration), missing privileges, a database that refuses writes (a demoted primary). Retrying
/// through the delay queues would only dead-letter every message; the runtime holds them instead
/// until the database is fit.
pub const DEPLOYMENT_ERROR_CODES: &[&str] = &[
    "db.undefined_object",
    "db.insufficient_privilege",
    "db.read_only_transaction",
];

impl HandlerError {
    /// True for a failure of the deployment, not of the message ([`DEPLOYMENT_ERROR_CODES`]):
    /// the runtime holds the message and reports the database not ready, rather than spend a
    /// retry or dead-letter it.
    pub fn is_deployment(&self) -> bool {
        DEPLOYMENT_ERROR_CODES.contains(&self.code())
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} error {}: {}",
            self.kind.as_str(),
            self.code,
            self.message
        )
    }
}

impl StdError for HandlerError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// JSON a handler decodes by itself (a nested document, say) and cannot read: permanent.
impl From<serde_json::Error> for HandlerError {
    fn from(e: serde_json::Error) -> Self {
        let kind = if e.is_io() {
            ErrorKind::Retryable
        } else {
            ErrorKind::Permanent
        };
        HandlerError::new(kind, "json", e.to_string()).with_source(e)
    }
}

/// I/O failures (a socket reset, a timeout) are transient.
impl From<std::io::Error> for HandlerError {
    fn from(e: std::io::Error) -> Self {
        HandlerError::retryable("io", e.to_string()).with_source(e)
    }
}

#[cfg(feature = "diesel")]
mod diesel_errors {
    use super::{ErrorKind, HandlerError};
    use diesel::result::{DatabaseErrorKind, Error};

    /// PostgreSQL reports these without a dedicated Diesel kind; all are worth a retry.
    const TRANSIENT_MESSAGES: &[&str] = &[
        "deadlock detected",
        "could not serialize access",
        "canceling statement due to",
        "terminating connection",
        "could not obtain lock",
        "connection closed",
        "server closed the connection",
    ];

    /// Database errors classified by what retrying can change:
    /// serialization failures, deadlocks, lock and statement time-outs and lost connections
    /// are retryable; constraint violations and data errors are permanent.
    impl From<Error> for HandlerError {
        fn from(e: Error) -> Self {
            let (kind, code) = classify(&e);
            HandlerError::new(kind, code, e.to_string()).with_source(e)
        }
    }

    /// PostgreSQL's texts for 42P01 (`relation "t" does not exist`), 42703 (`column "c" does not
    /// exist`, `column "c" of relation "t" does not exist`), 42883 (`function f(..) does not
    /// exist`), 3F000 (`schema "s" does not exist`). diesel does not expose the SQLSTATE.
    fn is_undefined_object(message: &str) -> bool {
        message.ends_with("does not exist")
            && ["relation ", "column ", "function ", "schema ", "type "]
                .iter()
                .any(|object| message.starts_with(object))
    }

    fn classify(e: &Error) -> (ErrorKind, &'static str) {
        match e {
            Error::DatabaseError(kind, info) => match kind {
                DatabaseErrorKind::SerializationFailure => {
                    (ErrorKind::Retryable, "db.serialization_failure")
                }
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand => {
                    (ErrorKind::Retryable, "db.connection_lost")
                }
                DatabaseErrorKind::ReadOnlyTransaction => {
                    (ErrorKind::Retryable, "db.read_only_transaction")
                }
                DatabaseErrorKind::UniqueViolation => (ErrorKind::Permanent, "db.unique_violation"),
                DatabaseErrorKind::ForeignKeyViolation => {
                    (ErrorKind::Permanent, "db.foreign_key_violation")
                }
                DatabaseErrorKind::NotNullViolation => {
                    (ErrorKind::Permanent, "db.not_null_violation")
                }
                DatabaseErrorKind::CheckViolation => (ErrorKind::Permanent, "db.check_violation"),
                DatabaseErrorKind::RestrictViolation => {
                    (ErrorKind::Permanent, "db.restrict_violation")
                }
                DatabaseErrorKind::ExclusionViolation => {
                    (ErrorKind::Permanent, "db.exclusion_violation")
                }
                _ => {
                    let message = info.message();
                    if TRANSIENT_MESSAGES.iter().any(|m| message.contains(m)) {
                        (ErrorKind::Retryable, "db.transient")
                    } else if is_undefined_object(message) {
                        (ErrorKind::Retryable, "db.undefined_object")
                    } else if message.starts_with("permission denied") {
                        (ErrorKind::Retryable, "db.insufficient_privilege")
                    } else {
                        (ErrorKind::Permanent, "db.error")
                    }
                }
            },
            Error::NotFound => (ErrorKind::Permanent, "db.not_found"),
            Error::DeserializationError(_) | Error::SerializationError(_) => {
                (ErrorKind::Permanent, "db.data")
            }
            Error::InvalidCString(_) | Error::IntegerConversion(_) => {
                (ErrorKind::Permanent, "db.data")
            }
            Error::QueryBuilderError(_) => (ErrorKind::Permanent, "db.query_builder"),
            Error::BrokenTransactionManager | Error::RollbackErrorOnCommit { .. } => {
                (ErrorKind::Retryable, "db.transaction")
            }
            _ => (ErrorKind::Retryable, "db.transaction"),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn db(kind: DatabaseErrorKind, message: &str) -> Error {
            Error::DatabaseError(kind, Box::new(message.to_owned()))
        }

        #[test]
        fn transient_database_errors_are_retryable() {
            for e in [
                db(
                    DatabaseErrorKind::SerializationFailure,
                    "could not serialize",
                ),
                db(DatabaseErrorKind::ClosedConnection, "closed"),
                db(DatabaseErrorKind::UnableToSendCommand, "connection reset"),
                db(DatabaseErrorKind::Unknown, "deadlock detected"),
                db(
                    DatabaseErrorKind::Unknown,
                    "canceling statement due to statement timeout",
                ),
                db(
                    DatabaseErrorKind::Unknown,
                    "terminating connection due to administrator command",
                ),
                Error::BrokenTransactionManager,
            ] {
                let h = HandlerError::from(e);
                assert_eq!(h.kind(), ErrorKind::Retryable, "{h}");
            }
        }

        #[test]
        fn errors_of_the_deployment_are_told_apart_from_the_message() {
            for (message, code) in [
                (
                    r#"relation "invoices" does not exist"#,
                    "db.undefined_object",
                ),
                (r#"column "currency" does not exist"#, "db.undefined_object"),
                (
                    r#"column "currency" of relation "invoices" does not exist"#,
                    "db.undefined_object",
                ),
                (
                    "function gen_invoice_no(text) does not exist",
                    "db.undefined_object",
                ),
                (
                    "permission denied for table invoices",
                    "db.insufficient_privilege",
                ),
            ] {
                let h = HandlerError::from(db(DatabaseErrorKind::Unknown, message));
                assert_eq!(h.code(), code, "{message}");
                assert!(h.is_deployment(), "{message}");
            }
            let read_only = HandlerError::from(db(
                DatabaseErrorKind::ReadOnlyTransaction,
                "cannot execute INSERT in a read-only transaction",
            ));
            assert!(read_only.is_deployment());
            let data = HandlerError::from(db(
                DatabaseErrorKind::Unknown,
                r#"invalid input syntax for type integer: "x""#,
            ));
            assert!(
                !data.is_deployment(),
                "the message's own data is its failure"
            );
        }

        #[test]
        fn constraint_and_data_errors_are_permanent() {
            for (e, code) in [
                (
                    db(DatabaseErrorKind::UniqueViolation, "dup"),
                    "db.unique_violation",
                ),
                (
                    db(DatabaseErrorKind::ForeignKeyViolation, "fk"),
                    "db.foreign_key_violation",
                ),
                (
                    db(DatabaseErrorKind::NotNullViolation, "nn"),
                    "db.not_null_violation",
                ),
                (
                    db(DatabaseErrorKind::CheckViolation, "ck"),
                    "db.check_violation",
                ),
                (db(DatabaseErrorKind::Unknown, "syntax error"), "db.error"),
                (Error::NotFound, "db.not_found"),
                (Error::DeserializationError("bad".into()), "db.data"),
            ] {
                let h = HandlerError::from(e);
                assert_eq!(h.kind(), ErrorKind::Permanent, "{h}");
                assert_eq!(h.code(), code);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_set_kind_code_and_message() {
        let cases = [
            (HandlerError::retryable("a", "x"), ErrorKind::Retryable),
            (HandlerError::permanent("b", "y"), ErrorKind::Permanent),
            (HandlerError::park("c", "z"), ErrorKind::Park),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind);
        }
        let e = HandlerError::park("manual_review", "amount above limit");
        assert_eq!(e.code(), "manual_review");
        assert_eq!(e.message(), "amount above limit");
        assert_eq!(
            e.to_string(),
            "park error manual_review: amount above limit"
        );
    }

    #[test]
    fn source_is_kept() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let e = HandlerError::from(io);
        assert_eq!(e.kind(), ErrorKind::Retryable);
        assert!(StdError::source(&e).is_some());
    }

    #[test]
    fn json_syntax_errors_are_permanent() {
        let err = serde_json::from_str::<u32>("x").expect_err("not json");
        assert_eq!(HandlerError::from(err).kind(), ErrorKind::Permanent);
    }
}
