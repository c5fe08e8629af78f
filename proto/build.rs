//! Generates the tonic/prost bindings for `kommune.agent.v1`. protoc comes from
//! `protoc-bin-vendored` unless `PROTOC` is set, so a build needs no system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure().compile_with_config(config, &["kommune/agent/v1/agent.proto"], &["."])?;
    println!("cargo:rerun-if-changed=kommune/agent/v1/agent.proto");
    Ok(())
}
