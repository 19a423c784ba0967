//! Switchyard's compute kernels.
//!
//! Every operation the engine runs is defined here first as a CPU implementation. Those
//! implementations are the engine's CPU execution path *and* the specification that device
//! kernels must match: a device kernel is correct when it agrees with the function of the same
//! name in this crate within the tolerance of its dtype.
//!
//! Layout conventions shared by all kernels:
//! - activations are row-major `[tokens, features]` `f32` slices;
//! - a linear layer's weight is stored as PyTorch stores it, `[out_features, in_features]`, and
//!   the layer computes `y = x · Wᵀ`;
//! - the KV cache is paged: see [`attention`].

pub mod attention;
pub mod cuda;
pub mod lora;
pub mod matmul;
pub mod ops;
pub mod quant;
pub mod team;

pub use attention::{AttentionSeq, KvLayout, KvValue};
pub use lora::{LoraMat, Segment};
