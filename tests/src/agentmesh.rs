//! Real `agentmesh` processes for end-to-end tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::process::{START_ATTEMPTS, says_port_taken};
use crate::{free_ports, wait_until};

/// Path of a workspace binary (`agentmesh`, `meshctl`) built next to the test executable, or
/// from `AGENTMESH_BIN_DIR`.
///
/// # Errors
/// Fails with the command that builds it when it is missing.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("AGENTMESH_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe()?;
            // target/<profile>/deps/<test> → target/<profile>
            exe.parent()
                .and_then(|deps| deps.parent())
                .context("test executable has no parent")?
                .to_path_buf()
        }
    };
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build it first with `cargo build --workspace --bins`",
            path.display()
        );
    }
    Ok(path)
}

/// A running `agentmesh` process, killed on drop.
pub struct AgentmeshProcess {
    child: Child,
    /// gRPC address of its (first) service.
    pub grpc_addr: SocketAddr,
    /// Admin HTTP address of its (first) service.
    pub admin_addr: SocketAddr,
    /// gRPC and admin addresses of its event bus, when it runs one.
    pub eventbus: Option<(SocketAddr, SocketAddr)>,
    log: tempfile::NamedTempFile,
}

impl AgentmeshProcess {
    /// Starts `agentmesh serve ratelimit` on free loopback ports, with `etcd` when given, plus
    /// `extra` arguments; waits until its gRPC port accepts connections.
    ///
    /// # Errors
    /// Fails when the binary is missing or the process does not come up within 15 s.
    pub async fn serve_ratelimit(etcd: Option<&str>, extra: &[&str]) -> anyhow::Result<Self> {
        let (process, _) = Self::spawn_on_ports(&[], |[grpc, admin]: &[String; 2]| {
            let mut args = vec![
                "serve",
                "ratelimit",
                "--ratelimit-listen",
                grpc,
                "--ratelimit-admin-listen",
                admin,
            ];
            if let Some(endpoint) = etcd {
                args.extend(["--etcd", endpoint]);
            }
            args.extend_from_slice(extra);
            args.into_iter().map(str::to_owned).collect()
        })
        .await?;
        Ok(process)
    }

    /// Starts `agentmesh dev` with the rate limiter on free loopback ports.
    ///
    /// # Errors
    /// Fails when the binary is missing or the process does not come up within 15 s.
    pub async fn dev() -> anyhow::Result<Self> {
        Self::dev_with_env(&[]).await
    }

    /// Starts `agentmesh dev` with extra environment variables (e.g. `OTEL_*`).
    ///
    /// # Errors
    /// Fails when the binary is missing or the process does not come up within 15 s.
    pub async fn dev_with_env(envs: &[(&str, &str)]) -> anyhow::Result<Self> {
        let (mut process, [_, _, bus, bus_admin]) =
            Self::spawn_on_ports(envs, |[grpc, admin, bus, bus_admin]: &[String; 4]| {
                [
                    "dev",
                    "--ratelimit-listen",
                    grpc,
                    "--ratelimit-admin-listen",
                    admin,
                    "--eventbus-listen",
                    bus,
                    "--eventbus-admin-listen",
                    bus_admin,
                ]
                .map(str::to_owned)
                .to_vec()
            })
            .await?;
        process.eventbus = Some((bus, bus_admin));
        Ok(process)
    }

    /// Starts `agentmesh serve eventbus` on free loopback ports (`grpc_addr` is the bus), with
    /// Redis and etcd when given, plus `extra` arguments.
    ///
    /// # Errors
    /// Fails when the binary is missing or the process does not come up within 15 s.
    pub async fn serve_eventbus(
        redis: Option<&str>,
        etcd: Option<&str>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let (mut process, [grpc, admin]) =
            Self::spawn_on_ports(&[], |[grpc, admin]: &[String; 2]| {
                let mut args = vec![
                    "serve",
                    "eventbus",
                    "--eventbus-listen",
                    grpc,
                    "--eventbus-admin-listen",
                    admin,
                ];
                if let Some(url) = redis {
                    args.extend(["--redis", url]);
                }
                if let Some(endpoint) = etcd {
                    args.extend(["--etcd", endpoint]);
                }
                args.extend_from_slice(extra);
                args.into_iter().map(str::to_owned).collect()
            })
            .await?;
        process.eventbus = Some((grpc, admin));
        Ok(process)
    }

    /// Starts `agentmesh` on `N` distinct free loopback ports (the first two are the gRPC and
    /// admin addresses it is waited on by); `args` builds its arguments from them. A port can
    /// be taken by another process between being chosen and being bound, so on "address
    /// already in use" it starts again on new ports, up to three times.
    async fn spawn_on_ports<const N: usize>(
        envs: &[(&str, &str)],
        args: impl Fn(&[String; N]) -> Vec<String>,
    ) -> anyhow::Result<(Self, [SocketAddr; N])> {
        let mut attempt = 1;
        loop {
            let addrs: [SocketAddr; N] = free_ports::<N>()
                .map(|port| SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)));
            let argv = args(&addrs.map(|a| a.to_string()));
            match Self::spawn(&argv, envs, addrs[0], addrs[1]).await {
                Ok(process) => return Ok((process, addrs)),
                Err(e) if attempt < START_ATTEMPTS && says_port_taken(&e.to_string()) => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts `agentmesh` and waits until its gRPC port accepts connections, or fails as soon
    /// as it exits.
    async fn spawn(
        args: &[String],
        envs: &[(&str, &str)],
        grpc_addr: SocketAddr,
        admin_addr: SocketAddr,
    ) -> anyhow::Result<Self> {
        let log = tempfile::NamedTempFile::new()?;
        let child = Command::new(binary("agentmesh")?)
            .args(args)
            .env_remove("AGENTMESH_ETCD_ENDPOINTS")
            .env_remove("AGENTMESH_REDIS_URL")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("AGENTMESH_LEASE_TTL", "2s")
            .env("AGENTMESH_SHUTDOWN_GRACE", "3s")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?)
            .spawn()
            .context("cannot start agentmesh")?;
        let mut process = Self {
            child,
            grpc_addr,
            admin_addr,
            eventbus: None,
            log,
        };
        let up = wait_until(Duration::from_secs(15), "agentmesh gRPC port", || {
            let exited = matches!(process.child.try_wait(), Ok(Some(_)));
            async move { exited || tokio::net::TcpStream::connect(grpc_addr).await.is_ok() }
        })
        .await;
        let status = process.child.try_wait().ok().flatten();
        if let Err(e) = up {
            bail!("{e}; exit status {status:?}; log:\n{}", process.logs());
        }
        if let Some(status) = status {
            bail!(
                "agentmesh exited at start-up ({status}); log:\n{}",
                process.logs()
            );
        }
        Ok(process)
    }

    /// The process id.
    #[must_use]
    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX))
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn sigterm(&self) {
        let _ = kill(self.pid(), Signal::SIGTERM);
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) {
        let _ = kill(self.pid(), Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Waits for the process to exit.
    ///
    /// # Errors
    /// Fails when it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "agentmesh still running after {timeout:?}; log:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the process wrote so far.
    #[must_use]
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for AgentmeshProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a workspace binary to completion with `args`, returning (exit code, stdout, stderr).
///
/// # Errors
/// Fails when the binary is missing or cannot be run.
pub fn run_binary(bin: &str, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let output = Command::new(binary(bin)?)
        .args(args)
        .env_remove("AGENTMESH_ETCD_ENDPOINTS")
        .output()?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// A minimal HTTP/1.0 GET, returning (status code, body).
///
/// # Errors
/// Fails when the connection or the response is broken.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    Ok((code, body.to_owned()))
}

/// Checks Prometheus text exposition: every sample belongs to a family with HELP and TYPE,
/// names are valid, values parse. Returns the problems found.
#[must_use]
pub fn prometheus_text_problems(text: &str) -> Vec<String> {
    use std::collections::HashSet;
    let mut problems = Vec::new();
    let (mut helped, mut typed) = (HashSet::new(), HashSet::new());
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(
                rest.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            );
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(
                rest.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            );
        } else if line.starts_with('#') {
        } else {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            let value = line.rsplit(' ').next().unwrap_or_default();
            if !valid_name(name) {
                problems.push(format!("invalid metric name in {line:?}"));
            }
            if value.parse::<f64>().is_err() && !["+Inf", "-Inf", "NaN"].contains(&value) {
                problems.push(format!("invalid value in {line:?}"));
            }
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                .unwrap_or(name);
            if !typed.contains(family) || !helped.contains(family) {
                problems.push(format!("{name} has no HELP/TYPE"));
            }
        }
    }
    problems
}
