//! A real Redis on a free loopback port, in its own temporary directory, without persistence.

use std::process::Command;
use std::time::Duration;

use anyhow::bail;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::free_port;
use crate::process::{ChildProcess, START_ATTEMPTS};

const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `redis-server`, stopped and its directory removed on drop.
pub struct RedisServer {
    // Declared first: dropped (killed) before the directory is removed.
    process: Option<ChildProcess>,
    dir: TempDir,
    port: u16,
}

impl RedisServer {
    /// Starts Redis and waits until it answers `PING`.
    pub async fn start() -> anyhow::Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port();
            let dir = tempfile::Builder::new()
                .prefix("agentmesh-redis-")
                .tempdir()?;
            let mut server = Self {
                process: None,
                dir,
                port,
            };
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(e) if attempt < START_ATTEMPTS && server.port_conflict() => {
                    eprintln!("redis port {port} was taken; retrying: {e:#}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port Redis listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGTERM and wait for exit (no data is kept).
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.terminate();
        }
    }

    /// SIGKILL and wait for exit.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Stops Redis if running and starts it again on the same port (empty: no persistence).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.launch().await
    }

    fn port_conflict(&self) -> bool {
        self.process
            .as_ref()
            .is_some_and(ChildProcess::port_conflict)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        self.process = Some(ChildProcess::spawn("redis", command, self.dir.path())?);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let Some(process) = self.process.as_mut() else {
                bail!("redis is not running");
            };
            if let Some(status) = process.exited() {
                let logs = process.log_tail();
                eprintln!("{logs}");
                bail!(
                    "redis exited during start-up ({status}) on port {}\n{logs}",
                    self.port
                );
            }
            if pong(self.port).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let logs = process.log_tail();
                eprintln!("{logs}");
                bail!(
                    "redis on port {} did not answer within {READY_TIMEOUT:?}\n{logs}",
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// True when a raw `PING` on the port gets `+PONG`.
async fn pong(port: u16) -> bool {
    let ping = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut reply = [0_u8; 16];
        let n = stream.read(&mut reply).await?;
        Ok::<_, std::io::Error>(reply[..n].starts_with(b"+PONG"))
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), ping).await,
        Ok(Ok(true))
    )
}
