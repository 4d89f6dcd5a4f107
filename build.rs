//! Compiles the gRPC contract in `proto/` into Rust, with no system `protoc`:
//! protox parses the files (it bundles the well-known types such as
//! `google/protobuf/timestamp.proto`), tonic-prost-build generates the messages,
//! clients and server traits, and the encoded descriptor set is written beside
//! them for gRPC server reflection (`src/proto.rs` includes both).

use std::{env, fs, path::PathBuf};

/// Every file of package `safeguard.v1`, relative to `proto/`.
const PROTOS: &[&str] = &[
    "safeguard/v1/common.proto",
    "safeguard/v1/concern.proto",
    "safeguard/v1/consent.proto",
    "safeguard/v1/record.proto",
    "safeguard/v1/audit.proto",
    "safeguard/v1/operations.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler
        .include_imports(true) // reflection needs timestamp.proto too
        .include_source_info(true) // proto comments become rustdoc
        .open_files(PROTOS)?;

    // prost-build's `compile_fds` does not write `file_descriptor_set_path`
    // itself (only its protoc path does), so write the set here.
    fs::write(
        out_dir.join("safeguard_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;

    // The benchmark's bare echo baseline, kept out of the gateway's descriptor set.
    let mut bench = protox::Compiler::new(["proto"])?;
    bench.open_files(["sgw/bench/v1/echo.proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(bench.file_descriptor_set())?;

    Ok(())
}
