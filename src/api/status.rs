//! The single place where errors become `tonic::Status`. Every arm is explicit (no
//! wildcard), so a new error variant does not compile until someone decides its
//! code. Internal failures reach the caller as a generic message plus the request
//! id; their detail goes to the log only.

use tonic::Status;

use crate::audit::AuditError;

/// A request-scoped error that knows its gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A field is malformed: INVALID_ARGUMENT.
    #[error("{0}")]
    Invalid(String),
    /// Not found, or not visible to this caller: NOT_FOUND.
    #[error("{0}")]
    NotFound(String),
    /// Policy forbids it: PERMISSION_DENIED.
    #[error("{0}")]
    Denied(String),
    /// A precondition (consent, state) is missing: FAILED_PRECONDITION.
    #[error("{0}")]
    Precondition(String),
    /// A limit was reached: RESOURCE_EXHAUSTED.
    #[error("{0}")]
    Exhausted(String),
    /// Outside the valid range: OUT_OF_RANGE.
    #[error("{0}")]
    OutOfRange(String),
    /// Storage the answer depends on could not be read; the caller may retry:
    /// UNAVAILABLE. `message` goes to the caller, `detail` to the log only.
    #[error("{message}")]
    Unavailable {
        /// What could not be done, safe to return.
        message: String,
        /// Why, for the log.
        detail: String,
    },
    /// The audit log failed.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Anything else that is the gateway's fault.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// Converts to a status, logging internal detail with the request id.
    pub fn into_status(self, request_id: &str) -> Status {
        match self {
            ApiError::Invalid(m) => Status::invalid_argument(m),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::Denied(m) => Status::permission_denied(m),
            ApiError::Precondition(m) => Status::failed_precondition(m),
            ApiError::Exhausted(m) => Status::resource_exhausted(m),
            ApiError::OutOfRange(m) => Status::out_of_range(m),
            ApiError::Unavailable { message, detail } => {
                tracing::error!(request_id, detail, "refused: storage unavailable");
                Status::unavailable(format!("{message}; retry later (request id {request_id})"))
            }
            ApiError::Audit(e) => audit_status(e, request_id),
            ApiError::Internal(m) => internal(&m, request_id),
        }
    }
}

fn audit_status(e: AuditError, request_id: &str) -> Status {
    match e {
        AuditError::Unavailable(detail) => {
            tracing::error!(
                request_id,
                detail,
                "refused: the audit log cannot be written"
            );
            Status::unavailable(format!(
                "the audit log cannot be written, so nothing can be disclosed now; retry later (request id {request_id})"
            ))
        }
        AuditError::Corrupt(detail) => {
            internal(&format!("audit log damaged: {detail}"), request_id)
        }
        AuditError::OutOfRange(m) => Status::out_of_range(m),
        AuditError::BadPageToken => {
            Status::invalid_argument("page_token is not valid for this query")
        }
        AuditError::TooMany(m) => Status::resource_exhausted(m),
    }
}

fn internal(detail: &str, request_id: &str) -> Status {
    tracing::error!(request_id, detail, "internal error");
    Status::internal(format!("internal error (request id {request_id})"))
}
