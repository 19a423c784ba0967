//! The Switchyard gateway: the edge tenants and operators talk to. This crate grows by module:
//! [`auth`] verifies callers' JWTs and says who they are and what they may do.

pub mod auth;
