//! The client's errors: one enum for every call, mapped from gRPC status codes in
//! [`ClientError::from_status`] (the one place it is done).

use tonic::Code;

/// Why a call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// [`Client::connect`](crate::Client::connect) was given no address.
    #[error("no node address given")]
    NoAddresses,
    /// An address could not be turned into a gRPC endpoint.
    #[error("invalid node address {addr:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The request was refused as invalid; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// A lease or instance that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// No node answered (or every node said it had no leader) within the retry budget.
    #[error("no node could serve the request after {attempts} attempt(s); last error: {last}")]
    Unavailable {
        /// How many attempts were made.
        attempts: u32,
        /// The last node's error message.
        last: String,
    },
    /// Any other gRPC error, with its code and the server's message.
    #[error("{message} ({code:?})")]
    Rpc {
        /// The gRPC status code.
        code: Code,
        /// The server's message.
        message: String,
    },
    /// A response lacked a field the protocol requires.
    #[error("malformed response from the server: {0}")]
    MalformedResponse(String),
    /// No instance of a service can be picked.
    #[error("no instance of service {service:?} is available: {reason}")]
    NoInstance {
        /// The service asked for.
        service: String,
        /// Why none is available (none registered, none healthy, all breakers open).
        reason: String,
    },
    /// A static fallback file or variable could not be read.
    #[error("invalid static fallback in {origin}: {reason}")]
    InvalidFallback {
        /// The file or environment variable.
        origin: String,
        /// What is wrong, naming the service.
        reason: String,
    },
    /// A TLS file could not be read or used.
    #[error("tls {setting}: {reason}")]
    Tls {
        /// The setting (`ca`, `cert`, `key`).
        setting: &'static str,
        /// What is wrong, naming the file.
        reason: String,
    },
}

impl ClientError {
    /// Maps a gRPC status that is not retried to an error.
    pub fn from_status(status: &tonic::Status) -> Self {
        let message = status.message().to_string();
        match status.code() {
            Code::InvalidArgument => ClientError::InvalidArgument(message),
            Code::NotFound => ClientError::NotFound(message),
            Code::Unavailable => ClientError::Unavailable {
                attempts: 1,
                last: message,
            },
            code => ClientError::Rpc { code, message },
        }
    }

    /// The gRPC code this error corresponds to.
    pub fn code(&self) -> Code {
        match self {
            ClientError::NoAddresses | ClientError::InvalidAddress { .. } | ClientError::InvalidArgument(_) => {
                Code::InvalidArgument
            }
            ClientError::NotFound(_) => Code::NotFound,
            ClientError::Unavailable { .. } => Code::Unavailable,
            ClientError::Rpc { code, .. } => *code,
            ClientError::MalformedResponse(_) => Code::Internal,
            ClientError::NoInstance { .. } => Code::Unavailable,
            ClientError::InvalidFallback { .. } | ClientError::Tls { .. } => Code::InvalidArgument,
        }
    }
}

/// Whether a failed call should be tried again on another node.
///
/// `UNAVAILABLE` covers both a node that cannot be reached (tonic reports transport
/// errors with this code) and one that has no leader or is shutting down. Writes are
/// safe to retry on another node because every node forwards them to the leader and
/// registration is an idempotent put.
pub(crate) fn is_retryable(status: &tonic::Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        // A connection reset mid-call surfaces as UNKNOWN with a transport source.
        Code::Unknown => status.message().contains("transport error") || status.message().contains("connection"),
        _ => false,
    }
}

/// The server's `retry-after-ms` hint on an `UNAVAILABLE` answer, if any.
pub(crate) fn retry_after(status: &tonic::Status) -> Option<std::time::Duration> {
    status
        .metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(std::time::Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_keeps_the_servers_message_naming_the_field() {
        let e = ClientError::from_status(&tonic::Status::invalid_argument("port: must be in 1..=65535"));
        assert_eq!(e, ClientError::InvalidArgument("port: must be in 1..=65535".into()));
        assert_eq!(e.to_string(), "port: must be in 1..=65535");
    }

    #[test]
    fn unavailable_is_retried_and_invalid_argument_is_not() {
        assert!(is_retryable(&tonic::Status::unavailable("no leader")));
        assert!(!is_retryable(&tonic::Status::invalid_argument("service")));
        assert!(!is_retryable(&tonic::Status::not_found("lease 3 not found")));
    }

    #[test]
    fn the_retry_hint_is_read_from_metadata() {
        let mut s = tonic::Status::unavailable("no leader");
        s.metadata_mut().insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(retry_after(&s), Some(std::time::Duration::from_millis(250)));
        assert_eq!(retry_after(&tonic::Status::unavailable("x")), None);
    }
}
