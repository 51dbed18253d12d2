//! Compiles every agentmesh proto (and the subset of Envoy's API the rate limiter serves) into
//! Rust and writes one descriptor set for reflection.
//!
//! The protos are parsed by `protox` (pure Rust, Google's well-known types built in), so this
//! crate needs no system `protoc` and no `libprotobuf-dev`. (etcd-client's own build script
//! still runs `protoc`; `scripts/install-deps.sh` installs it for that.)
use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "agentmesh/common/v1/common.proto",
        "agentmesh/ratelimit/v1/ratelimit.proto",
        "agentmesh/eventbus/v1/eventbus.proto",
        "agentmesh/scheduler/v1/scheduler.proto",
        "agentmesh/rules/v1/rules.proto",
        "agentmesh/cache/v1/cache.proto",
        "agentmesh/health/v1/health.proto",
        "grpc/health/v1/health.proto",
        "agentmesh/bench/v1/echo.proto",
        "envoy/service/ratelimit/v3/rls.proto",
        "envoy/extensions/common/ratelimit/v3/ratelimit.proto",
        "envoy/type/v3/ratelimit_unit.proto",
        "envoy/config/core/v3/base.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let descriptors = protox::Compiler::new([&root])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(files)?
        .file_descriptor_set();
    #[allow(
        clippy::disallowed_methods,
        reason = "cargo passes a build script OUT_DIR this way"
    )]
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("agentmesh_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    for entry in std::fs::read_dir(&out_dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            use_server_codec(&path)?;
        }
    }
    Ok(())
}

/// Makes the generated servers decode requests with `crate::codec::ServerCodec` (an undecodable
/// request is the caller's mistake: INVALID_ARGUMENT, not tonic's INTERNAL); clients keep
/// `tonic_prost::ProstCodec`. tonic-prost-build has one codec setting for both sides, so the
/// server's `let codec = …; let mut grpc = tonic::server::Grpc::new(codec)` lines are rewritten;
/// the build fails if the generated code no longer has that shape.
fn use_server_codec(path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    const DEFAULT: &str = "let codec = tonic_prost::ProstCodec::default();";
    let text = std::fs::read_to_string(path)?;
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let servers = text.matches("tonic::server::Grpc::new(codec)").count();
    let mut rewritten = 0;
    for i in 1..lines.len() {
        if lines[i].contains("tonic::server::Grpc::new(codec)") && lines[i - 1].contains(DEFAULT) {
            lines[i - 1] =
                lines[i - 1].replace("tonic_prost::ProstCodec", "crate::codec::ServerCodec");
            rewritten += 1;
        }
    }
    if rewritten != servers {
        return Err(format!(
            "{}: {servers} generated server methods but {rewritten} codec lines rewritten: \
             tonic-prost-build's output changed shape; update use_server_codec",
            path.display()
        )
        .into());
    }
    std::fs::write(path, lines.join("\n") + "\n")?;
    Ok(())
}
