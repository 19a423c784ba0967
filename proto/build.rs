//! Generates the gRPC code from `proto/` with a pure-Rust protobuf compiler, so building needs no
//! system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/switchyard/backend/v1/backend.proto"];
    let descriptors = protox::compile(files, ["proto"])?;
    // Also kept whole, for the server's reflection service (grpcurl and friends need no .proto).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("backend_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    Ok(())
}
