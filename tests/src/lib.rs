//! Cluster harness for agentmesh end-to-end tests.
//!
//! Starts **real** processes (etcd, Redis, and agentmesh services) on free loopback ports, each
//! in its own temporary directory with stdout/stderr captured to files there. Dropping a handle
//! kills the process and removes the directory; a start-up failure prints the tail of the logs.

pub mod agentmesh;
pub mod bus;
mod etcd;
mod process;
pub mod raw;
mod redis;
pub mod trace_sink;

use std::future::Future;
use std::net::TcpListener;
use std::time::Duration;

pub use etcd::EtcdServer;
pub use redis::RedisServer;

/// A port that was free on 127.0.0.1 a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` distinct free ports, all held until every one is chosen.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let ports = free_port_list(N);
    std::array::from_fn(|i| ports[i])
}

/// `n` distinct free ports, all held until every one is chosen.
pub(crate) fn free_port_list(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .expect("local address of a bound listener")
                .port()
        })
        .collect()
}

/// Polls `condition` every 50 ms until it holds; fails after `timeout`, naming `what`.
pub async fn wait_until<F, Fut>(
    timeout: Duration,
    what: &str,
    mut condition: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `tracing` output to the test's captured output (`RUST_LOG` overrides the default
/// filter). Safe to call from every test.
pub fn init_test_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,h2=warn,hyper=warn,tower=warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_redis_starts_answers_and_stops() {
        let mut redis = RedisServer::start().await.unwrap();
        assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
        let addr = ("127.0.0.1", redis.port());
        assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
        redis.stop();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        redis.restart().await.unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    }

    #[test]
    fn test_free_ports_are_distinct() {
        let [a, b, c] = free_ports();
        assert!(a != b && b != c && a != c);
        assert_ne!(free_port(), 0);
    }

    #[tokio::test]
    async fn test_wait_until_names_what_it_waited_for() {
        let err = wait_until(Duration::from_millis(120), "the impossible", || async {
            false
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("the impossible"));
        wait_until(Duration::from_millis(10), "truth", || async { true })
            .await
            .unwrap();
    }
}
