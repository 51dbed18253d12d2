//! `trace-sink`: an OTLP/gRPC trace receiver answering Jaeger's query API from memory, the
//! stand-in for Jaeger in the compose test (see `agentmesh_tests::trace_sink`).
//!
//! ```text
//! trace-sink [OTLP_LISTEN] [QUERY_LISTEN] [CAPACITY]
//! ```
//! Defaults: `0.0.0.0:4317` (OTLP/gRPC, as Jaeger), `0.0.0.0:16686` (query API, as Jaeger),
//! 200000 spans kept (the oldest dropped first).

use agentmesh_tests::trace_sink::TraceSink;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let otlp = args.next().unwrap_or_else(|| "0.0.0.0:4317".to_owned());
    let query = args.next().unwrap_or_else(|| "0.0.0.0:16686".to_owned());
    let capacity: usize = match args.next() {
        Some(n) => n.parse()?,
        None => 200_000,
    };
    let sink = TraceSink::new(capacity);
    let otlp_listener = tokio::net::TcpListener::bind(&otlp).await?;
    let query_listener = tokio::net::TcpListener::bind(&query).await?;
    eprintln!(
        "trace-sink: OTLP/gRPC on {otlp}, Jaeger query API on {query}, {capacity} spans kept"
    );
    tokio::spawn(sink.clone().serve_query(query_listener));
    tokio::select! {
        served = sink.serve_otlp(otlp_listener) => served,
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminated() => Ok(()),
    }
}

/// SIGTERM (what `docker stop` sends).
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut signal) => {
            signal.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
