//! The OpenAI-compatible surface: request bodies as SDKs send them, response bodies and errors
//! in OpenAI's shape.

pub mod error;
pub mod response;
mod structured;
pub mod tools;
mod types;

pub use error::ErrorType;
pub use types::{
    ChatRequest, CompletionPrompt, CompletionRequest, Generation, MAX_STOP, Message, parse_chat, parse_completion,
};
