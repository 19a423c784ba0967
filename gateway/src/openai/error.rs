//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP
//! status OpenAI uses for each kind, so SDKs raise the exception users expect. [`status`] is
//! the one mapping from the gateway's error codes to HTTP.

use crate::error::{Code, Error};
use serde::Serialize;

/// The `type` field, which OpenAI SDKs map to exception classes together with the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    InvalidRequestError,
    AuthenticationError,
    PermissionError,
    NotFoundError,
    ConflictError,
    UnprocessableEntityError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
}

/// The HTTP status and error type of a failure with `code`.
pub fn status(code: &Code) -> (u16, ErrorType) {
    use ErrorType::*;
    match code {
        Code::InvalidRequest
        | Code::UnknownParameter
        | Code::UnsupportedParameter
        | Code::DuplicateAuthorization
        | Code::NoSuchTenant => (400, InvalidRequestError),
        Code::MethodNotAllowed => (405, InvalidRequestError),
        Code::RequestTooLarge => (413, InvalidRequestError),
        Code::HeadersTooLarge => (431, InvalidRequestError),

        Code::MissingToken
        | Code::MalformedToken
        | Code::AlgorithmNotAccepted
        | Code::UnknownKey
        | Code::InvalidSignature
        | Code::TokenExpired
        | Code::TokenNotYetValid
        | Code::InvalidAudience
        | Code::InvalidIssuer
        | Code::MissingClaim
        | Code::MissingTenant => (401, AuthenticationError),

        Code::InsufficientScope
        | Code::UnknownTenant
        | Code::BackendNotAllowed
        | Code::AdapterNotAllowed
        | Code::AdapterNotOwned
        | Code::SourceNotAllowed
        | Code::PolicyNotAllowed
        | Code::OwnerNotAllowed
        | Code::IgnoreEosNotAllowed
        | Code::AdapterSourceDenied
        | Code::PolicyQuotaExceeded => (403, PermissionError),

        Code::UnknownUrl | Code::ModelNotFound | Code::LoraNotFound | Code::PoliciesDisabled | Code::PolicyNotFound => {
            (404, NotFoundError)
        }

        Code::LoraExists
        | Code::AdapterOwnedByAnother
        | Code::AdapterBusy
        | Code::OperationInProgress
        | Code::ChangedConcurrently
        | Code::OperationExpired
        | Code::PolicyInUse
        | Code::NothingToRollBack => (409, ConflictError),

        Code::InvalidAdapter | Code::AdapterSourceNotFound | Code::InvalidPolicy | Code::PolicyDryRunFailed => {
            (422, UnprocessableEntityError)
        }

        Code::RateLimitExceeded | Code::ConcurrencyLimitExceeded => (429, RateLimitError),

        Code::OperationLost | Code::PolicyFailed | Code::StateDamaged => (500, ServerError),
        Code::BackendError | Code::IncompleteGeneration => (502, ServerError),
        Code::OperationTimeout | Code::FirstTokenTimeout => (504, ServerError),

        Code::NoBackend
        | Code::BackendBusy
        | Code::BackendResourceExhausted
        | Code::BackendUnavailable
        | Code::PolicyBusy
        | Code::StateUnavailable => (503, ServiceUnavailableError),

        // A tenant's policy chooses a 4xx; anything else it names becomes 403.
        Code::Refused { status, .. } => match *status {
            400 => (400, InvalidRequestError),
            401 => (401, AuthenticationError),
            404 => (404, NotFoundError),
            409 => (409, ConflictError),
            422 => (422, UnprocessableEntityError),
            429 => (429, RateLimitError),
            s @ 402..=499 if s != 403 => (s, InvalidRequestError),
            _ => (403, PermissionError),
        },
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: ErrorType,
    param: Option<&'a str>,
    code: &'a str,
}

/// The JSON body for `e`.
pub fn body(e: &Error) -> String {
    let inner =
        Inner { message: &e.message, kind: status(&e.code).1, param: e.param.as_deref(), code: e.code.as_str() };
    // Serializing plain strings and an enum of unit variants cannot fail.
    serde_json::to_string(&Body { error: inner }).unwrap_or_else(|_| String::from(r#"{"error":{}}"#))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_openai_shape_and_codes_their_status() {
        let e = Error::invalid("temperature must be between 0 and 2", Some("temperature"));
        let body: serde_json::Value = serde_json::from_str(&body(&e)).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "temperature must be between 0 and 2",
                "type": "invalid_request_error", "param": "temperature", "code": "invalid_request"}})
        );
        let denied = Error::from(crate::auth::AuthError::MissingScope { scope: "lora:load" });
        assert_eq!(status(&denied.code), (403, ErrorType::PermissionError));
        let expired = Error::from(crate::auth::AuthError::Expired);
        assert_eq!(status(&expired.code), (401, ErrorType::AuthenticationError));
    }

    #[test]
    fn a_policy_chooses_only_client_errors() {
        let refused = |status| Code::Refused { status, code: "tenant_suspended".into() };
        assert_eq!(status(&refused(429)), (429, ErrorType::RateLimitError));
        assert_eq!(status(&refused(451)), (451, ErrorType::InvalidRequestError));
        assert_eq!(status(&refused(200)), (403, ErrorType::PermissionError));
        assert_eq!(status(&refused(503)), (403, ErrorType::PermissionError));
        assert_eq!(refused(429).as_str(), "tenant_suspended");
    }
}
