//! A real single-node etcd on free loopback ports, in its own temporary directory.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use etcd_client::{Client, ConnectOptions};
use tempfile::TempDir;
use tokio::time::Instant;

use crate::free_ports;
use crate::process::{ChildProcess, START_ATTEMPTS};

/// How long etcd gets to answer after being started.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const NAME: &str = "agentmesh-test";

/// A running etcd (`/usr/bin/etcd`), stopped and its directory removed on drop.
pub struct EtcdServer {
    // Declared first: dropped (killed) before the directory is removed.
    process: Option<ChildProcess>,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    /// Bumped on every wipe so the new cluster gets a new cluster id.
    generation: u32,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers requests.
    pub async fn start() -> anyhow::Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let [client_port, peer_port] = free_ports();
            let dir = tempfile::Builder::new()
                .prefix("agentmesh-etcd-")
                .tempdir()?;
            let mut server = Self {
                process: None,
                dir,
                client_port,
                peer_port,
                generation: 0,
            };
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(e) if attempt < START_ATTEMPTS && server.port_conflict() => {
                    eprintln!("etcd ports {client_port}/{peer_port} were taken; retrying: {e:#}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.client_port
    }

    /// A fresh client for this etcd (short connect timeout).
    pub async fn client(&self) -> anyhow::Result<Client> {
        let options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        Client::connect([self.endpoint()], Some(options))
            .await
            .with_context(|| format!("connecting to etcd at {}", self.endpoint()))
    }

    /// The process id of the running etcd, if any.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ChildProcess::pid)
    }

    /// SIGTERM and wait for exit (data kept).
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.terminate();
        }
    }

    /// SIGKILL and wait for exit (data kept).
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Stops etcd if running and starts it again on the same ports with the same data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.launch().await
    }

    /// Stops etcd if running, wipes its data (every key and lease is gone, revisions restart)
    /// and starts it again on the same ports.
    pub async fn restart_wiped(&mut self) -> anyhow::Result<()> {
        self.stop();
        let data = self.data_dir();
        if data.exists() {
            std::fs::remove_dir_all(&data).with_context(|| format!("wiping {}", data.display()))?;
        }
        self.generation += 1;
        self.launch().await
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn port_conflict(&self) -> bool {
        self.process
            .as_ref()
            .is_some_and(ChildProcess::port_conflict)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let client_url = format!("http://127.0.0.1:{}", self.client_port);
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let token = format!(
            "{NAME}-{}-{}-{}",
            std::process::id(),
            self.client_port,
            self.generation
        );
        let mut command = Command::new("etcd");
        command
            .arg("--name")
            .arg(NAME)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("{NAME}={peer_url}")])
            .args(["--initial-cluster-token", &token])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        // The ETCD_* environment would override the flags above.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(key);
            }
        }
        self.process = Some(ChildProcess::spawn("etcd", command, self.dir.path())?);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let Some(process) = self.process.as_mut() else {
                bail!("etcd is not running");
            };
            if let Some(status) = process.exited() {
                let logs = process.log_tail();
                eprintln!("{logs}");
                bail!(
                    "etcd exited during start-up ({status}) on port {}\n{logs}",
                    self.client_port
                );
            }
            if self.answers().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let logs = process_logs(self.process.as_ref());
                eprintln!("{logs}");
                bail!(
                    "etcd on port {} did not answer within {READY_TIMEOUT:?}\n{logs}",
                    self.client_port
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// True when a linearizable read succeeds (so a leader has been elected).
    async fn answers(&self) -> bool {
        let probe = async {
            let options = ConnectOptions::new().with_connect_timeout(Duration::from_millis(500));
            let mut client = Client::connect([self.endpoint()], Some(options)).await?;
            client.get("/agentmesh-test/ready", None).await
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), probe).await,
            Ok(Ok(_))
        )
    }
}

fn process_logs(process: Option<&ChildProcess>) -> String {
    process.map_or_else(|| "(not running)".to_owned(), ChildProcess::log_tail)
}
