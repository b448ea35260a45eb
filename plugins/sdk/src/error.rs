//! Connector errors: a class the host acts on, a stable code and a message.

use std::fmt;

/// What kind of failure an error is. The host decides retries from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The config is wrong: the manifest has to be fixed. Never retried.
    Config,
    /// Credentials were refused. Never retried.
    Auth,
    /// The credentials lack a permission. Never retried.
    Permission,
    /// The remote asked to slow down. Retried after `retry_after_ms`.
    RateLimited,
    /// A passing fault (timeout, 5xx, connection reset). Retried with backoff.
    Transient,
    /// The data itself was refused (one record or the whole batch).
    Data,
    /// The plugin does not implement this operation.
    Unsupported,
    /// A bug in the plugin.
    Internal,
}

impl ErrorClass {
    /// The class name as the contract spells it (`rate-limited`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Config => "config",
            ErrorClass::Auth => "auth",
            ErrorClass::Permission => "permission",
            ErrorClass::RateLimited => "rate-limited",
            ErrorClass::Transient => "transient",
            ErrorClass::Data => "data",
            ErrorClass::Unsupported => "unsupported",
            ErrorClass::Internal => "internal",
        }
    }

    /// Whether errors of this class are retried unless said otherwise:
    /// `rate-limited` and `transient` are, everything else is not.
    pub fn retryable_by_default(self) -> bool {
        matches!(self, ErrorClass::RateLimited | ErrorClass::Transient)
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error returned to the host.
///
/// Build one with the class constructors ([`ConnectorError::config`],
/// [`ConnectorError::transient`], [`ConnectorError::rate_limited`], …); they
/// set `retryable` from the class. `code` is stable and machine-readable
/// (`http_status_503`, `file_not_found`); `message` is for people and must
/// never contain secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorError {
    /// What kind of failure this is.
    pub class: ErrorClass,
    /// Whether the host may try the same call again.
    pub retryable: bool,
    /// For `rate-limited`: how long to wait before the retry.
    pub retry_after_ms: Option<u64>,
    /// A stable, machine-readable code.
    pub code: String,
    /// Human-readable, never containing secrets.
    pub message: String,
}

impl ConnectorError {
    /// An error of any class; `retryable` follows
    /// [`ErrorClass::retryable_by_default`].
    pub fn new(class: ErrorClass, code: impl Into<String>, message: impl Into<String>) -> Self {
        ConnectorError {
            class,
            retryable: class.retryable_by_default(),
            retry_after_ms: None,
            code: code.into(),
            message: message.into(),
        }
    }

    /// The config is wrong. Never retried.
    pub fn config(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Config, code, message)
    }

    /// Credentials were refused. Never retried.
    pub fn auth(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Auth, code, message)
    }

    /// The credentials lack a permission. Never retried.
    pub fn permission(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Permission, code, message)
    }

    /// The remote asked to slow down; retried after `retry_after_ms` (or
    /// with the host's backoff when `None`).
    pub fn rate_limited(retry_after_ms: Option<u64>, code: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::new(ErrorClass::RateLimited, code, message);
        e.retry_after_ms = retry_after_ms;
        e
    }

    /// A passing fault (timeout, 5xx, connection reset). Retried with backoff.
    pub fn transient(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Transient, code, message)
    }

    /// The data was refused. Not retried.
    pub fn data(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Data, code, message)
    }

    /// The operation is not implemented by this plugin.
    pub fn unsupported(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Unsupported, code, message)
    }

    /// A bug in the plugin.
    pub fn internal(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Internal, code, message)
    }

    /// Overrides whether the host may retry.
    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    /// Sets how long the host should wait before a retry.
    pub fn with_retry_after_ms(mut self, retry_after_ms: u64) -> Self {
        self.retry_after_ms = Some(retry_after_ms);
        self
    }
}

impl fmt::Display for ConnectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error [{}]: {}", self.class, self.code, self.message)
    }
}

impl std::error::Error for ConnectorError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_set_class_and_retryability() {
        let cases = [
            (ConnectorError::config("c", "m"), ErrorClass::Config, false),
            (ConnectorError::auth("c", "m"), ErrorClass::Auth, false),
            (ConnectorError::permission("c", "m"), ErrorClass::Permission, false),
            (ConnectorError::transient("c", "m"), ErrorClass::Transient, true),
            (ConnectorError::data("c", "m"), ErrorClass::Data, false),
            (ConnectorError::unsupported("c", "m"), ErrorClass::Unsupported, false),
            (ConnectorError::internal("c", "m"), ErrorClass::Internal, false),
            (
                ConnectorError::rate_limited(Some(5), "c", "m"),
                ErrorClass::RateLimited,
                true,
            ),
        ];
        for (err, class, retryable) in cases {
            assert_eq!(err.class, class);
            assert_eq!(err.retryable, retryable, "{class}");
            assert_eq!(err.code, "c");
            assert_eq!(err.message, "m");
        }
        assert_eq!(
            ConnectorError::rate_limited(Some(1500), "x", "y").retry_after_ms,
            Some(1500)
        );
        assert_eq!(ConnectorError::transient("x", "y").retry_after_ms, None);
    }

    #[test]
    fn overrides_and_display() {
        let e = ConnectorError::data("row_invalid", "bad row")
            .with_retryable(true)
            .with_retry_after_ms(10);
        assert!(e.retryable);
        assert_eq!(e.retry_after_ms, Some(10));
        assert_eq!(e.to_string(), "data error [row_invalid]: bad row");
        assert_eq!(ErrorClass::RateLimited.to_string(), "rate-limited");
    }
}
