//! Switchyard's backend: a gRPC server that keeps LoRA adapters resident and runs a
//! Llama-family model with continuous batching, each request on its own adapter.
//!
//! - [`model`]: configuration, weights and tokenizer of the base model;
//! - [`adapters`]: fetching, caching and validating PEFT adapters, the slot table, and the
//!   manager that owns each adapter's life;
//! - [`engine`]: scheduler, sampling, and the [`engine::executor::Executor`] seam with its CPU
//!   implementation;
//! - [`metrics`]: the Prometheus metrics operators scrape;
//! - [`service`]: the `switchyard.backend.v1.Backend` gRPC service and the server around it.

pub mod adapters;
pub mod bench;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod paths;
pub mod service;
