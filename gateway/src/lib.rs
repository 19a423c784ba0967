//! The Switchyard gateway: the edge tenants and operators talk to. This crate grows by module:
//! [`auth`] verifies callers' JWTs and says who they are and what they may do; [`openai`] reads
//! OpenAI-shaped requests and writes OpenAI-shaped errors.

pub mod auth;
pub mod openai;
