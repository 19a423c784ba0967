//! The one mapping from backend errors to gRPC status codes.

use crate::adapters::{AdapterError, ManagerError};
use crate::engine::EngineError;
use crate::engine::executor::ExecutorError;
use crate::engine::grammar::GrammarError;
use switchyard_proto::FIELD_METADATA;
use tonic::{Code, Status};

/// Every way a backend RPC can fail.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The request message itself is malformed (a missing field, bad text).
    #[error("{0}")]
    BadRequest(String),
    /// The call carries a fencing token below the highest seen: it comes from a gateway that
    /// no longer leads its fleet.
    #[error("fencing token {got} is stale: a gateway with token {highest} drives this backend now")]
    Fenced { got: u64, highest: u64 },
    /// A bug: a task of ours failed (panicked).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    /// The gRPC code: each names one kind of failure, so clients can act on it.
    pub fn code(&self) -> Code {
        match self {
            ServiceError::BadRequest(_) => Code::InvalidArgument,
            ServiceError::Internal(_) => Code::Internal,
            ServiceError::Fenced { .. } => Code::Aborted,
            ServiceError::Adapter(e) => match e {
                AdapterError::BadName { .. }
                | AdapterError::BadUri { .. }
                | AdapterError::Invalid { .. }
                | AdapterError::RankTooLarge { .. }
                | AdapterError::TooLarge { .. }
                | AdapterError::DigestMismatch { .. } => Code::InvalidArgument,
                AdapterError::NotFound { .. } | AdapterError::SourceNotFound { .. } => Code::NotFound,
                AdapterError::AccessDenied { .. } => Code::PermissionDenied,
                AdapterError::Unavailable { .. } => Code::Unavailable,
                AdapterError::CacheFull { .. } => Code::ResourceExhausted,
                AdapterError::Io { source, .. } => match source.kind() {
                    std::io::ErrorKind::PermissionDenied => Code::PermissionDenied,
                    std::io::ErrorKind::NotFound => Code::NotFound,
                    _ => Code::Internal,
                },
            },
            ServiceError::Engine(e) => match e {
                EngineError::UnknownAdapter(_) => Code::NotFound,
                EngineError::AdapterInUse { .. } | EngineError::UnloadTimedOut { .. } => Code::FailedPrecondition,
                EngineError::SlotsFull { .. } | EngineError::QueueFull { .. } | EngineError::TenantQueueFull { .. } => {
                    Code::ResourceExhausted
                }
                EngineError::InvalidRequest(_) => Code::InvalidArgument,
                EngineError::Grammar(GrammarError::Unavailable(_)) => Code::FailedPrecondition,
                EngineError::Grammar(_) => Code::InvalidArgument,
                EngineError::Stopped | EngineError::Failed(_) => Code::Unavailable,
                EngineError::Executor(e) | EngineError::AdapterLoadFailed { source: e, .. } => match e {
                    ExecutorError::OutOfMemory(_) => Code::ResourceExhausted,
                    ExecutorError::DeviceFault(_) => Code::Unavailable,
                    ExecutorError::Invalid(_) => Code::Internal,
                },
            },
        }
    }
}

impl ServiceError {
    /// Why a generation request was refused, for the metrics' `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            ServiceError::BadRequest(_)
            | ServiceError::Engine(EngineError::InvalidRequest(_) | EngineError::Grammar(_)) => "invalid_request",
            ServiceError::Engine(EngineError::QueueFull { .. }) => "queue_full",
            ServiceError::Engine(EngineError::TenantQueueFull { .. }) => "tenant_queue_full",
            ServiceError::Engine(EngineError::SlotsFull { .. }) => "slots_full",
            ServiceError::Engine(EngineError::UnknownAdapter(_)) => "unknown_adapter",
            ServiceError::Engine(EngineError::Stopped | EngineError::Failed(_)) => "not_serving",
            ServiceError::Engine(
                EngineError::Executor(ExecutorError::OutOfMemory(_))
                | EngineError::AdapterLoadFailed { source: ExecutorError::OutOfMemory(_), .. },
            ) => "out_of_memory",
            ServiceError::Adapter(_) | ServiceError::Engine(EngineError::AdapterLoadFailed { .. }) => {
                "adapter_unavailable"
            }
            _ => "internal",
        }
    }
}

impl From<ManagerError> for ServiceError {
    fn from(e: ManagerError) -> ServiceError {
        match e {
            ManagerError::Adapter(e) => ServiceError::Adapter(e),
            ManagerError::Engine(e) => ServiceError::Engine(e),
            ManagerError::Task(why) => ServiceError::Internal(format!("adapter task failed: {why}")),
        }
    }
}

impl ServiceError {
    /// The `GenerateRequest` field at fault, for errors about one.
    fn field(&self) -> Option<&'static str> {
        match self {
            ServiceError::Engine(EngineError::Grammar(e)) if !matches!(e, GrammarError::Unavailable(_)) => {
                Some("constraint")
            }
            _ => None,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        let field = e.field();
        let mut status = Status::new(e.code(), e.to_string());
        if let Some(field) = field {
            status.metadata_mut().insert(FIELD_METADATA, tonic::metadata::MetadataValue::from_static(field));
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_its_own_code() {
        let cases: Vec<(ServiceError, Code)> = vec![
            (ServiceError::Fenced { got: 3, highest: 7 }, Code::Aborted),
            (EngineError::UnknownAdapter("x".into()).into(), Code::NotFound),
            (EngineError::AdapterInUse { name: "x".into(), active: 1 }.into(), Code::FailedPrecondition),
            (EngineError::SlotsFull { max: 2 }.into(), Code::ResourceExhausted),
            (EngineError::QueueFull { max: 2 }.into(), Code::ResourceExhausted),
            (EngineError::TenantQueueFull { tenant: "a".into(), max: 1 }.into(), Code::ResourceExhausted),
            (EngineError::InvalidRequest("long".into()).into(), Code::InvalidArgument),
            (EngineError::Grammar(GrammarError::TooLarge { size: 1 << 20 }).into(), Code::InvalidArgument),
            (EngineError::Grammar(GrammarError::Invalid("bad".into())).into(), Code::InvalidArgument),
            (EngineError::Grammar(GrammarError::Unavailable("no EOS".into())).into(), Code::FailedPrecondition),
            (EngineError::Stopped.into(), Code::Unavailable),
            (EngineError::Failed("the device failed".into()).into(), Code::Unavailable),
            (EngineError::Executor(ExecutorError::OutOfMemory("KV".into())).into(), Code::ResourceExhausted),
            (
                EngineError::AdapterLoadFailed { source: ExecutorError::OutOfMemory("A".into()), dropped: None }.into(),
                Code::ResourceExhausted,
            ),
            (EngineError::Executor(ExecutorError::DeviceFault("illegal address".into())).into(), Code::Unavailable),
            (EngineError::Executor(ExecutorError::Invalid("slot 9".into())).into(), Code::Internal),
            (AdapterError::NotFound { path: "/x".into() }.into(), Code::NotFound),
            (
                AdapterError::SourceNotFound { uri: "s3://b/x".into(), reason: "no bucket".into() }.into(),
                Code::NotFound,
            ),
            (
                AdapterError::AccessDenied { uri: "s3://b/x".into(), reason: "403".into() }.into(),
                Code::PermissionDenied,
            ),
            (AdapterError::Unavailable { uri: "s3://b/x".into(), reason: "refused".into() }.into(), Code::Unavailable),
            (
                AdapterError::CacheFull { uri: "s3://b/x".into(), needed: 2, budget: 1, pinned: 1, reserved: 0 }.into(),
                Code::ResourceExhausted,
            ),
            (
                AdapterError::DigestMismatch { uri: "s3://b/x".into(), expected: "a".into(), actual: "b".into() }
                    .into(),
                Code::InvalidArgument,
            ),
            (
                AdapterError::RankTooLarge { path: "/x".into(), module: "q".into(), rank: 64, max: 16 }.into(),
                Code::InvalidArgument,
            ),
        ];
        for (err, code) in cases {
            let msg = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{msg}");
            assert_eq!(status.message(), msg);
        }
        // A refused grammar names the field the gateway built it from.
        let status = Status::from(ServiceError::from(EngineError::Grammar(GrammarError::TimedOut)));
        assert_eq!(status.metadata().get(FIELD_METADATA).and_then(|v| v.to_str().ok()), Some("constraint"));
        let status = Status::from(ServiceError::from(EngineError::InvalidRequest("long".into())));
        assert!(status.metadata().get(FIELD_METADATA).is_none());
    }
}
