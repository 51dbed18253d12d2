//! The tokio runtime a binary runs on.

use std::io;

/// Builds the process's tokio runtime from `TOKIO_WORKER_THREADS`. `1` gives a current-thread
/// runtime: every task runs on the main thread, where a multi-thread runtime with one worker
/// would park the main thread in `block_on` and hand wake-ups between it and the worker across
/// threads (measured with three rate limiters and their client on two shared cores: about 4% less
/// server CPU at the same load, BENCHMARKS.md). Any other value, or none, gives tokio's
/// multi-thread runtime, which reads the variable itself (default: one worker per core).
///
/// # Errors
/// When the runtime cannot be created (e.g. the I/O driver cannot open its epoll instance).
#[allow(
    clippy::disallowed_methods,
    reason = "called by the binaries at start-up, beside clap's environment fallbacks"
)]
pub fn build_runtime() -> io::Result<tokio::runtime::Runtime> {
    runtime_for(std::env::var("TOKIO_WORKER_THREADS").ok().as_deref())
}

/// The runtime for a `TOKIO_WORKER_THREADS` value (see [`build_runtime`]).
fn runtime_for(worker_threads: Option<&str>) -> io::Result<tokio::runtime::Runtime> {
    let mut builder = if worker_threads.is_some_and(|v| v.trim() == "1") {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::runtime::RuntimeFlavor;

    fn flavor(worker_threads: Option<&str>) -> RuntimeFlavor {
        let runtime = runtime_for(worker_threads).unwrap();
        // Spawned tasks, timers and sockets work on either flavor.
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accept = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
            tokio::net::TcpStream::connect(addr).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            accept.await.unwrap().unwrap();
            tokio::runtime::Handle::current().runtime_flavor()
        })
    }

    #[test]
    fn test_one_worker_runs_on_the_current_thread_and_others_on_the_multi_thread_runtime() {
        assert_eq!(flavor(Some("1")), RuntimeFlavor::CurrentThread);
        assert_eq!(flavor(Some(" 1 ")), RuntimeFlavor::CurrentThread);
        assert_eq!(flavor(Some("2")), RuntimeFlavor::MultiThread);
        assert_eq!(flavor(None), RuntimeFlavor::MultiThread);
    }
}
