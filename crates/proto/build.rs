//! Compiles every agentmesh proto (and the subset of Envoy's API the rate limiter serves) into
//! Rust and writes one descriptor set for reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "agentmesh/common/v1/common.proto",
        "agentmesh/ratelimit/v1/ratelimit.proto",
        "agentmesh/eventbus/v1/eventbus.proto",
        "agentmesh/bench/v1/echo.proto",
        "envoy/service/ratelimit/v3/rls.proto",
        "envoy/extensions/common/ratelimit/v3/ratelimit.proto",
        "envoy/type/v3/ratelimit_unit.proto",
        "envoy/config/core/v3/base.proto",
    ];
    let paths: Vec<PathBuf> = files.iter().map(|f| root.join(f)).collect();
    for path in &paths {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("agentmesh_descriptor.bin"))
        .compile_protos(&paths, &[root])?;
    Ok(())
}
