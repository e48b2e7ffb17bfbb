//! The gateway's own answers: every refusal is a JSON object
//! `{"error", "service", "reason"}` (plus `"field"` when an input is wrong), and
//! this module is the one place that maps them to HTTP status codes.

use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use serde_json::json;

/// Why the gateway answered a proxied request itself.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The first path segment is not a valid service name (400).
    #[error("invalid service: {reason}")]
    InvalidService {
        /// The segment as given.
        service: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The path names the gateway's own prefix (404).
    #[error("/{service}/ is reserved for the gateway's own endpoints")]
    Reserved {
        /// The reserved segment.
        service: String,
    },
    /// No instance can take the request (503).
    #[error("no instance of {service:?} is available: {reason}")]
    NoInstance {
        /// The service.
        service: String,
        /// Why (none registered, none healthy, every breaker open, registry unreachable).
        reason: String,
    },
    /// The gateway already follows as many services as it may (503).
    #[error("the gateway follows at most {max} services")]
    TooManyServices {
        /// The service asked for.
        service: String,
        /// The limit.
        max: usize,
    },
    /// The gateway already relays as many upgraded connections as it may (503).
    #[error("the gateway relays at most {max} upgraded connections at once")]
    TooManyTunnels {
        /// The service asked for.
        service: String,
        /// The limit.
        max: usize,
    },
    /// The request body is larger than allowed (413).
    #[error("the request body exceeds {max} bytes")]
    BodyTooLarge {
        /// The service.
        service: String,
        /// The limit.
        max: u64,
    },
    /// The request body could not be read from the client (400).
    #[error("reading the request body failed: {reason}")]
    BadRequestBody {
        /// The service.
        service: String,
        /// What failed.
        reason: String,
    },
    /// The instance could not be reached or failed before answering, and the
    /// request could not be sent elsewhere (502).
    #[error("upstream {instance} failed: {reason}")]
    Upstream {
        /// The service.
        service: String,
        /// The instance id last tried.
        instance: String,
        /// What failed.
        reason: String,
    },
    /// The instance did not answer in time (504).
    #[error("upstream {instance} did not answer within {timeout_ms} ms")]
    Timeout {
        /// The service.
        service: String,
        /// The instance id.
        instance: String,
        /// The configured timeout.
        timeout_ms: u64,
    },
}

impl ProxyError {
    /// The HTTP status of this answer.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::InvalidService { .. } | ProxyError::BadRequestBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::Reserved { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoInstance { .. } | ProxyError::TooManyServices { .. } | ProxyError::TooManyTunnels { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The gRPC status code of this answer to a gRPC call.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            ProxyError::InvalidService { .. } | ProxyError::BadRequestBody { .. } => tonic::Code::InvalidArgument,
            ProxyError::Reserved { .. } => tonic::Code::NotFound,
            ProxyError::NoInstance { .. } | ProxyError::Upstream { .. } => tonic::Code::Unavailable,
            ProxyError::TooManyServices { .. }
            | ProxyError::TooManyTunnels { .. }
            | ProxyError::BodyTooLarge { .. } => tonic::Code::ResourceExhausted,
            ProxyError::Timeout { .. } => tonic::Code::DeadlineExceeded,
        }
    }

    /// The answer to a gRPC call: a trailers-only response (HTTP 200) whose
    /// `grpc-status` is [`ProxyError::grpc_code`] and whose `grpc-message` names
    /// the service and the reason.
    pub fn into_grpc_response(self) -> Response {
        let message = format!("gateway, service {:?}: {self}", self.service());
        tonic::Status::new(self.grpc_code(), message).into_http()
    }

    /// The service the request named.
    pub fn service(&self) -> &str {
        match self {
            ProxyError::InvalidService { service, .. }
            | ProxyError::Reserved { service }
            | ProxyError::NoInstance { service, .. }
            | ProxyError::TooManyServices { service, .. }
            | ProxyError::TooManyTunnels { service, .. }
            | ProxyError::BodyTooLarge { service, .. }
            | ProxyError::BadRequestBody { service, .. }
            | ProxyError::Upstream { service, .. }
            | ProxyError::Timeout { service, .. } => service,
        }
    }

    /// A short machine-readable kind, the `error` field of the answer.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::InvalidService { .. } => "invalid_service",
            ProxyError::Reserved { .. } => "reserved_path",
            ProxyError::NoInstance { .. } => "no_instance",
            ProxyError::TooManyServices { .. } => "too_many_services",
            ProxyError::TooManyTunnels { .. } => "too_many_tunnels",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::BadRequestBody { .. } => "bad_request_body",
            ProxyError::Upstream { .. } => "upstream_failed",
            ProxyError::Timeout { .. } => "upstream_timeout",
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "error": self.kind(),
            "service": self.service(),
            "reason": self.to_string(),
        });
        match &self {
            ProxyError::InvalidService { .. } => body["field"] = json!("service"),
            ProxyError::NoInstance { reason, .. } => body["reason"] = json!(reason),
            ProxyError::Upstream { instance, .. } | ProxyError::Timeout { instance, .. } => {
                body["instance"] = json!(instance)
            }
            _ => {}
        }
        (self.status(), Json(body)).into_response()
    }
}

/// Why [`serve`](crate::serve) could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] crate::ConfigError),
    /// The registry client could not be built from the node addresses.
    #[error("invalid --nodes: {0}")]
    Client(#[from] muster_client::ClientError),
    /// The listener failed.
    #[error("serving HTTP failed: {0}")]
    Io(#[from] std::io::Error),
    /// The listener's certificate or key could not be used.
    #[error(transparent)]
    Tls(#[from] muster_server::tls::TlsError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_has_its_status() {
        let service = || "web".to_string();
        assert_eq!(
            ProxyError::InvalidService {
                service: service(),
                reason: "x".into()
            }
            .status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            ProxyError::NoInstance {
                service: service(),
                reason: "no instance is registered".into()
            }
            .status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ProxyError::TooManyTunnels {
                service: service(),
                max: 1
            }
            .status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ProxyError::BodyTooLarge {
                service: service(),
                max: 1
            }
            .status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            ProxyError::Timeout {
                service: service(),
                instance: "w1".into(),
                timeout_ms: 5
            }
            .status(),
            StatusCode::GATEWAY_TIMEOUT
        );
    }
}
