//! Generates the Tinker protobuf types from `proto/tinker_public.proto` into `OUT_DIR`.
//!
//! protox parses the file in Rust, so building needs no `protoc` binary; prost-build turns the
//! descriptor into the `prost::Message` types that `src/protocol/tinker/proto.rs` includes.

use std::path::PathBuf;

const PROTO: &str = "proto/tinker_public.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    println!("cargo:rerun-if-changed=build.rs");
    // Source info carries the .proto comments into the generated doc comments.
    let fds = protox::Compiler::new(["proto"])?
        .include_source_info(true)
        .open_file("tinker_public.proto")?
        .file_descriptor_set();
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    prost_build::Config::new()
        // Ordered maps keep encoding deterministic (map entries go out in key order), which the
        // byte-level tests and reproducible responses rely on.
        .btree_map(["."])
        .out_dir(&out)
        .compile_fds(fds)?;
    Ok(())
}
