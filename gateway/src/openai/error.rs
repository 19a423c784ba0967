//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP
//! status OpenAI uses for each kind, so SDKs raise the exception users expect.

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

/// An error answer: status, body fields, and (for 503) when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub kind: ErrorType,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A stable machine-readable code.
    pub code: Option<String>,
    pub retry_after_s: Option<u64>,
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
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: u16, kind: ErrorType, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, message: message.into(), param: None, code: None, retry_after_s: None }
    }

    /// 400: the request is malformed or asks for something unsupported.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError { param: param.map(str::to_string), ..ApiError::new(400, ErrorType::InvalidRequestError, message) }
    }

    /// 401: the caller is not authenticated.
    pub fn unauthenticated(message: impl Into<String>, code: &str) -> ApiError {
        ApiError { code: Some(code.to_string()), ..ApiError::new(401, ErrorType::AuthenticationError, message) }
    }

    /// 403: authenticated, but not allowed.
    pub fn forbidden(message: impl Into<String>, code: &str) -> ApiError {
        ApiError { code: Some(code.to_string()), ..ApiError::new(403, ErrorType::PermissionError, message) }
    }

    /// 404: the named model (or adapter) does not exist for this caller.
    pub fn not_found(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError { param: param.map(str::to_string), ..ApiError::new(404, ErrorType::NotFoundError, message) }
    }

    /// 503: nothing can serve this now; retry after the given seconds.
    pub fn unavailable(message: impl Into<String>, retry_after_s: u64) -> ApiError {
        ApiError {
            retry_after_s: Some(retry_after_s),
            ..ApiError::new(503, ErrorType::ServiceUnavailableError, message)
        }
    }

    /// 409: the request conflicts with the current state.
    pub fn conflict(message: impl Into<String>, code: &str) -> ApiError {
        ApiError { code: Some(code.to_string()), ..ApiError::new(409, ErrorType::ConflictError, message) }
    }

    /// 413: the body is larger than the gateway accepts.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError {
            code: Some("request_too_large".into()),
            ..ApiError::new(413, ErrorType::InvalidRequestError, format!("the request body exceeds {limit} bytes"))
        }
    }

    /// 422: well-formed, but what it names cannot be used (an adapter that does not fit).
    pub fn unprocessable(message: impl Into<String>, code: &str) -> ApiError {
        ApiError { code: Some(code.to_string()), ..ApiError::new(422, ErrorType::UnprocessableEntityError, message) }
    }

    /// 500/502: the gateway's own failure, or a backend answering outside its contract.
    pub fn server(status: u16, message: impl Into<String>, code: &str) -> ApiError {
        ApiError { code: Some(code.to_string()), ..ApiError::new(status, ErrorType::ServerError, message) }
    }

    /// A 4xx chosen by someone else (a routing policy), with the error type OpenAI uses for
    /// that status. Anything outside 400–499 becomes 403.
    pub fn client(status: u16, message: impl Into<String>, code: &str) -> ApiError {
        let (status, kind) = match status {
            400 => (400, ErrorType::InvalidRequestError),
            401 => (401, ErrorType::AuthenticationError),
            404 => (404, ErrorType::NotFoundError),
            409 => (409, ErrorType::ConflictError),
            422 => (422, ErrorType::UnprocessableEntityError),
            429 => (429, ErrorType::RateLimitError),
            s @ 402..=499 if s != 403 => (s, ErrorType::InvalidRequestError),
            _ => (403, ErrorType::PermissionError),
        };
        ApiError { code: Some(code.to_string()), ..ApiError::new(status, kind, message) }
    }

    /// With a machine-readable code.
    pub fn with_code(mut self, code: &str) -> ApiError {
        self.code = Some(code.to_string());
        self
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        let inner =
            Inner { message: &self.message, kind: self.kind, param: self.param.as_deref(), code: self.code.as_deref() };
        // Serializing plain strings and an enum of unit variants cannot fail.
        serde_json::to_string(&Body { error: inner }).unwrap_or_else(|_| String::from(r#"{"error":{}}"#))
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> ApiError {
        match e.status() {
            403 => ApiError::forbidden(e.to_string(), e.code()),
            _ => ApiError::unauthenticated(e.to_string(), e.code()),
        }
    }
}

impl From<crate::authz::Denied> for ApiError {
    fn from(e: crate::authz::Denied) -> ApiError {
        use crate::authz::Denied;
        let (message, code) = (e.to_string(), e.code());
        match e {
            Denied::ModelNotFound(_) => ApiError::not_found(message, Some("model")).with_code(code),
            Denied::LoraNotFound { .. } => ApiError::not_found(message, None).with_code(code),
            Denied::NoSuchPolicyScope(_) => ApiError::invalid(message, Some("tenant")).with_code(code),
            Denied::UnknownTenant(_)
            | Denied::BackendNotAllowed { .. }
            | Denied::NameNotAllowed(_)
            | Denied::NotOwner { .. }
            | Denied::SourceNotAllowed(_)
            | Denied::PolicyNotAllowed(_) => ApiError::forbidden(message, code),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_openai_shape_and_auth_errors_their_status() {
        let e = ApiError::invalid("temperature must be between 0 and 2", Some("temperature"));
        let body: serde_json::Value = serde_json::from_str(&e.body()).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "temperature must be between 0 and 2",
                "type": "invalid_request_error", "param": "temperature", "code": null}})
        );
        let denied = ApiError::from(crate::auth::AuthError::MissingScope { scope: "lora:load" });
        assert_eq!(
            (denied.status, denied.kind, denied.code.as_deref()),
            (403, ErrorType::PermissionError, Some("insufficient_scope"))
        );
        let expired = ApiError::from(crate::auth::AuthError::Expired);
        assert_eq!((expired.status, expired.kind), (401, ErrorType::AuthenticationError));
    }
}
