fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The protoc shipped inside a crate, so a fresh machine needs no system protobuf compiler.
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/kiln.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto/kiln.proto");
    Ok(())
}
