//! The errors every frontend maps to its own status, and their gRPC mapping (the one
//! place it is done).

use muster_core::{Rejection, ValidationError};
use serde::{Deserialize, Serialize};

/// Why a request failed, independent of the protocol it came in on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ApiError {
    /// The request is invalid; names the field.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A lease that does not exist.
    #[error("lease {0} not found")]
    LeaseNotFound(u64),
    /// A lease id already in use.
    #[error("lease {0} already exists")]
    LeaseExists(u64),
    /// An instance that is not registered.
    #[error("instance {0} not found")]
    InstanceNotFound(String),
    /// A check that does not exist.
    #[error("check {0} not found")]
    CheckNotFound(String),
    /// No leader can be reached; retry after the hint.
    #[error("no leader reachable ({reason}); retry in {retry_after_ms} ms")]
    NoLeader {
        /// What was tried.
        reason: String,
        /// Suggested wait before retrying.
        retry_after_ms: u64,
    },
    /// The read could not be served in time (e.g. `min_revision` not reached).
    #[error("{0}")]
    Timeout(String),
    /// The node is shutting down.
    #[error("node is shutting down")]
    ShuttingDown,
    /// A membership change was refused.
    #[error("membership change refused: {0}")]
    Membership(String),
    /// Something that should not happen; the request may or may not have been applied.
    #[error("internal error: {0}")]
    Internal(String),
    /// A member runs, or is pinned to, an older command level than this write needs
    /// (last, so older builds decode every earlier variant the same way).
    #[error("{0}")]
    ClusterTooOld(String),
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        match r {
            Rejection::Invalid(v) => ApiError::Invalid(v),
            Rejection::LeaseNotFound(id) => ApiError::LeaseNotFound(id),
            Rejection::LeaseExists(id) => ApiError::LeaseExists(id),
            Rejection::InstanceNotFound(key) => ApiError::InstanceNotFound(key.to_string()),
            Rejection::CheckNotFound { key, check_id } => {
                ApiError::CheckNotFound(format!("{check_id:?} of instance {key}"))
            }
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let message = e.to_string();
        match e {
            ApiError::Invalid(_) => tonic::Status::invalid_argument(message),
            ApiError::LeaseNotFound(_) | ApiError::InstanceNotFound(_) | ApiError::CheckNotFound(_) => {
                tonic::Status::not_found(message)
            }
            ApiError::LeaseExists(_) => tonic::Status::already_exists(message),
            ApiError::NoLeader { retry_after_ms, .. } => {
                let mut status = tonic::Status::unavailable(message);
                if let Ok(v) = retry_after_ms.to_string().parse() {
                    status.metadata_mut().insert("retry-after-ms", v);
                }
                status
            }
            ApiError::Timeout(_) => tonic::Status::deadline_exceeded(message),
            ApiError::ShuttingDown => tonic::Status::unavailable(message),
            ApiError::Membership(_) | ApiError::ClusterTooOld(_) => tonic::Status::failed_precondition(message),
            ApiError::Internal(_) => tonic::Status::internal(message),
        }
    }
}

impl ApiError {
    /// The HTTP status code for this error (used by every HTTP frontend).
    pub fn http_status(&self) -> u16 {
        match self {
            ApiError::Invalid(_) => 400,
            ApiError::LeaseNotFound(_) | ApiError::InstanceNotFound(_) | ApiError::CheckNotFound(_) => 404,
            ApiError::LeaseExists(_) | ApiError::Membership(_) | ApiError::ClusterTooOld(_) => 409,
            ApiError::NoLeader { .. } | ApiError::ShuttingDown => 503,
            ApiError::Timeout(_) => 504,
            ApiError::Internal(_) => 500,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_input_maps_to_invalid_argument_naming_the_field() {
        let status = tonic::Status::from(ApiError::Invalid(ValidationError::new("service", "must not be empty")));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("service"));
    }

    #[test]
    fn no_leader_maps_to_unavailable_with_a_retry_hint() {
        let status = tonic::Status::from(ApiError::NoLeader {
            reason: "election".into(),
            retry_after_ms: 250,
        });
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.metadata().get("retry-after-ms").unwrap(), "250");
    }

    #[test]
    fn unknown_lease_maps_to_not_found() {
        assert_eq!(
            tonic::Status::from(ApiError::LeaseNotFound(9)).code(),
            tonic::Code::NotFound
        );
    }
}
