//! The backend contract, `switchyard.backend.v1`: generated messages, the server trait and the
//! client. Both the gateway and the backend depend on this crate and on nothing of each other.

#![allow(missing_docs, missing_debug_implementations, clippy::all)]

pub mod prefix;

/// Status metadata on an INVALID_ARGUMENT naming the `GenerateRequest` field at fault, where the
/// caller built that field from one of its own client's (the gateway then names that one).
pub const FIELD_METADATA: &str = "switchyard-field";

/// Version 1 of the backend service.
pub mod v1 {
    tonic::include_proto!("switchyard.backend.v1");

    /// The encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/backend_descriptor.bin"));
}
