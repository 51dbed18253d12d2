//! Real `agentmesh` processes for end-to-end tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::process::{START_ATTEMPTS, says_port_taken};
use crate::{free_port_list, wait_until};

/// Path of a workspace binary (`agentmesh`, `meshctl`) built next to the test executable, or
/// from `AGENTMESH_BIN_DIR`.
///
/// # Errors
/// Fails with the command that builds it when it is missing.
#[allow(
    clippy::disallowed_methods,
    reason = "the harness is a test tool: the binaries' directory may be given from outside"
)]
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

/// A service the `agentmesh` binary runs, as `agentmesh services` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Its name, as in `agentmesh serve <name>`.
    pub name: String,
    /// Default gRPC port.
    pub grpc_port: u16,
    /// Default admin HTTP port.
    pub admin_port: u16,
    /// The flag of its gRPC listen address, e.g. `--ratelimit-listen`.
    pub listen_flag: String,
    /// The flag of its admin listen address.
    pub admin_listen_flag: String,
}

/// The services the `agentmesh` binary runs (asked once per test process): the harness starts
/// whatever the binary's one list of services holds, so a new service needs no harness code.
///
/// # Errors
/// Fails when the binary is missing or its listing cannot be read.
pub fn services() -> anyhow::Result<Vec<ServiceInfo>> {
    static LISTED: std::sync::OnceLock<Result<Vec<ServiceInfo>, String>> =
        std::sync::OnceLock::new();
    LISTED
        .get_or_init(|| list_services().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn list_services() -> anyhow::Result<Vec<ServiceInfo>> {
    let (code, out, err) = run_binary("agentmesh", &["services"])?;
    if code != 0 {
        bail!("agentmesh services exited {code}: {err}");
    }
    out.lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [name, grpc, admin, listen, admin_listen] = fields[..] else {
                bail!("unexpected line from agentmesh services: {line:?}");
            };
            Ok(ServiceInfo {
                name: name.to_owned(),
                grpc_port: grpc.parse()?,
                admin_port: admin.parse()?,
                listen_flag: listen.to_owned(),
                admin_listen_flag: admin_listen.to_owned(),
            })
        })
        .collect()
}

/// A running `agentmesh` process, killed on drop.
pub struct AgentmeshProcess {
    child: Child,
    /// gRPC address of its (first) service; under `dev`, the rate limiter's.
    pub grpc_addr: SocketAddr,
    /// Admin HTTP address of its (first) service; under `dev`, the rate limiter's.
    pub admin_addr: SocketAddr,
    /// gRPC and admin addresses of its event bus, when it runs one.
    pub eventbus: Option<(SocketAddr, SocketAddr)>,
    /// gRPC and admin addresses of every service it runs, by name.
    pub addrs: std::collections::BTreeMap<String, (SocketAddr, SocketAddr)>,
    log: tempfile::NamedTempFile,
}

impl AgentmeshProcess {
    /// Starts `agentmesh serve <service>` on free loopback ports, with Redis and etcd when
    /// given, plus `extra` arguments; waits until its gRPC port accepts connections.
    ///
    /// # Errors
    /// Fails when the binary is missing, the service unknown, or the process does not come
    /// up within 15 s.
    pub async fn serve(
        service: &str,
        redis: Option<&str>,
        etcd: Option<&str>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let info = services()?
            .into_iter()
            .find(|s| s.name == service)
            .with_context(|| format!("agentmesh runs no service {service:?}"))?;
        Self::spawn_services(&[], "serve", std::slice::from_ref(&info), |args| {
            if let Some(url) = redis {
                args.extend(["--redis".to_owned(), url.to_owned()]);
            }
            if let Some(endpoint) = etcd {
                args.extend(["--etcd".to_owned(), endpoint.to_owned()]);
            }
            args.extend(extra.iter().map(|a| (*a).to_owned()));
        })
        .await
    }

    /// Starts `agentmesh serve ratelimit` on free loopback ports, with `etcd` when given, plus
    /// `extra` arguments; waits until its gRPC port accepts connections.
    ///
    /// # Errors
    /// Fails when the binary is missing or the process does not come up within 15 s.
    pub async fn serve_ratelimit(etcd: Option<&str>, extra: &[&str]) -> anyhow::Result<Self> {
        Self::serve("ratelimit", None, etcd, extra).await
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
        Self::serve("eventbus", redis, etcd, extra).await
    }

    /// Starts `agentmesh dev` with every service on free loopback ports.
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
        let mut all = services()?;
        // The rate limiter first: `grpc_addr` is its address, as tests expect of `dev`.
        all.sort_by_key(|s| s.name != "ratelimit");
        Self::spawn_services(envs, "dev", &all, |_| {}).await
    }

    /// Starts `agentmesh <command>` with `services` on distinct free loopback ports (the first
    /// service's gRPC port is the one waited on); `more` adds arguments. A port can be taken by
    /// another process between being chosen and being bound, so on "address already in use"
    /// it starts again on new ports, up to three times.
    async fn spawn_services(
        envs: &[(&str, &str)],
        command: &str,
        services: &[ServiceInfo],
        more: impl Fn(&mut Vec<String>),
    ) -> anyhow::Result<Self> {
        let first = services.first().context("no service to start")?;
        let mut attempt = 1;
        loop {
            let ports = free_port_list(services.len() * 2);
            let addr = |port: u16| SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
            let mut args = vec![command.to_owned()];
            if command == "serve" {
                args.extend(services.iter().map(|s| s.name.clone()));
            }
            let mut addrs = std::collections::BTreeMap::new();
            for (service, pair) in services.iter().zip(ports.chunks(2)) {
                let (grpc, admin) = (addr(pair[0]), addr(pair[1]));
                args.extend([
                    service.listen_flag.clone(),
                    grpc.to_string(),
                    service.admin_listen_flag.clone(),
                    admin.to_string(),
                ]);
                addrs.insert(service.name.clone(), (grpc, admin));
            }
            more(&mut args);
            let (grpc, admin) = addrs[&first.name];
            match Self::spawn(&args, envs, grpc, admin).await {
                Ok(mut process) => {
                    // Every service's port, not only the first one's: the services start one
                    // after another, and a test may call any of them at once.
                    for (name, (grpc, _)) in &addrs {
                        let grpc = *grpc;
                        wait_until(Duration::from_secs(15), name, || async move {
                            tokio::net::TcpStream::connect(grpc).await.is_ok()
                        })
                        .await?;
                    }
                    process.eventbus = addrs.get("eventbus").copied();
                    process.addrs = addrs;
                    return Ok(process);
                }
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
            addrs: std::collections::BTreeMap::new(),
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

/// `GET http://{addr}{path}` through the runtime's hyper client: (status code, body).
///
/// # Errors
/// Fails when the connection or the response is broken, or no answer comes within 10 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    Ok(
        agentmesh_runtime::scrape::get(&format!("http://{addr}{path}"), Duration::from_secs(10))
            .await?,
    )
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
