//! Configuration conventions shared by every agentmesh binary: flags with environment
//! fallbacks, durations written `2s`/`500ms`/`1m`, and exit code 64 with one clear line for
//! invalid configuration. This is the only module of the runtime that reads the environment
//! (through clap's `env` fallbacks).

use std::net::SocketAddr;
use std::time::Duration;

/// Exit code for invalid configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// Parses a duration such as `2s`, `500ms`, `1m` or `1h 30m`.
///
/// # Errors
/// Returns a message naming the expected format.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{e}: expected a duration such as 2s, 500ms or 1m"))
}

/// Parses a `host:port` socket address.
///
/// # Errors
/// Returns a message naming the expected format.
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.trim().parse().map_err(|_| {
        format!("expected host:port with a numeric IP, such as 0.0.0.0:7104, got {text:?}")
    })
}

/// Parses the process arguments, and on a configuration error prints one line naming the
/// setting and exits with [`EXIT_CONFIG`]. `--help` and `--version` print and exit 0.
#[must_use]
pub fn parse_args_or_exit<T: clap::Parser>() -> T {
    match T::try_parse() {
        Ok(args) => args,
        Err(err) => exit_on_clap_error(&err),
    }
}

/// Prints a clap error as one line (or the help text) and exits.
pub fn exit_on_clap_error(err: &clap::Error) -> ! {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            std::process::exit(0);
        }
        _ => {
            let rendered = err.to_string();
            let line = rendered
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments");
            eprintln!("{} (see --help)", line.trim());
            std::process::exit(EXIT_CONFIG);
        }
    }
}

/// Prints one configuration error line and exits with [`EXIT_CONFIG`].
pub fn exit_config_error(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(EXIT_CONFIG);
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the current span's fields (including `trace_id`).
    Json,
}

/// Settings every agentmesh process shares: cluster dependencies and shutdown.
#[derive(Clone, Debug, clap::Args)]
pub struct ClusterArgs {
    /// etcd endpoints, comma-separated (`http://127.0.0.1:2379`). Empty = in-memory membership
    /// (standalone).
    #[arg(
        long = "etcd",
        env = "AGENTMESH_ETCD_ENDPOINTS",
        value_delimiter = ',',
        global = true
    )]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix for everything agentmesh stores in etcd.
    #[arg(
        long,
        env = "AGENTMESH_ETCD_PREFIX",
        default_value = "/agentmesh",
        global = true
    )]
    pub etcd_prefix: String,
    /// PEM CA bundle etcd's certificate is signed by (`https://` endpoints).
    #[arg(long = "etcd-ca-file", env = "AGENTMESH_ETCD_CA_FILE", global = true)]
    pub etcd_ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate for etcd (`--client-cert-auth`); needs `--etcd-key-file`.
    #[arg(
        long = "etcd-cert-file",
        env = "AGENTMESH_ETCD_CERT_FILE",
        global = true,
        requires = "etcd_key_file"
    )]
    pub etcd_cert_file: Option<std::path::PathBuf>,
    /// PEM key of `--etcd-cert-file`.
    #[arg(
        long = "etcd-key-file",
        env = "AGENTMESH_ETCD_KEY_FILE",
        global = true,
        requires = "etcd_cert_file"
    )]
    pub etcd_key_file: Option<std::path::PathBuf>,
    /// Redis URL (`redis://127.0.0.1:6379`) for shared state; unset = in-memory state.
    /// `RATE_LIMIT_REDIS_URL` is honoured as an alias.
    #[arg(long = "redis", env = "AGENTMESH_REDIS_URL", global = true)]
    pub redis_url: Option<String>,
    #[arg(
        long = "rate-limit-redis-url",
        env = "RATE_LIMIT_REDIS_URL",
        hide = true,
        global = true
    )]
    redis_url_alias: Option<String>,
    /// Membership lease TTL; keep-alives are sent every TTL/3. Minimum 2s with etcd 3.4.
    #[arg(long, env = "AGENTMESH_LEASE_TTL", default_value = "10s", value_parser = parse_duration, global = true)]
    pub lease_ttl: Duration,
    /// Host or IP that peers use to reach this instance; defaults to the listen IP, or
    /// 127.0.0.1 when listening on 0.0.0.0 (set it in containers).
    #[arg(long, env = "AGENTMESH_ADVERTISE_HOST", global = true)]
    pub advertise_host: Option<String>,
    /// Failure-domain label recorded in membership.
    #[arg(long, env = "AGENTMESH_ZONE", default_value = "", global = true)]
    pub zone: String,
    /// How long in-flight RPCs may take to finish at shutdown before they are cut.
    #[arg(long, env = "AGENTMESH_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration, global = true)]
    pub shutdown_grace: Duration,
}

impl ClusterArgs {
    /// The Redis URL, from `--redis`/`AGENTMESH_REDIS_URL` or the `RATE_LIMIT_REDIS_URL` alias.
    #[must_use]
    pub fn redis_url(&self) -> Option<&str> {
        self.redis_url
            .as_deref()
            .or(self.redis_url_alias.as_deref())
            .filter(|u| !u.is_empty())
    }

    /// Checks values clap cannot check alone.
    ///
    /// # Errors
    /// Returns one line naming the setting and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if !self.etcd_endpoints.is_empty() && self.lease_ttl < Duration::from_secs(2) {
            return Err(format!(
                "AGENTMESH_LEASE_TTL/--lease-ttl is {:?}; etcd needs at least 2s",
                self.lease_ttl
            ));
        }
        if !self.etcd_prefix.starts_with('/') || self.etcd_prefix.ends_with('/') {
            return Err(format!(
                "AGENTMESH_ETCD_PREFIX/--etcd-prefix {:?} must start with '/' and not end with '/'",
                self.etcd_prefix
            ));
        }
        if let Some(url) = self.redis_url()
            && !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("unix://"))
        {
            return Err(format!(
                "AGENTMESH_REDIS_URL/--redis {url:?} must start with redis://, rediss:// or unix://"
            ));
        }
        Ok(())
    }
}

/// Whether calls must carry a valid token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Every call is accepted as the anonymous admin (development; said loudly at start).
    #[default]
    Off,
    /// Every call but `grpc.health.v1` needs a valid bearer token with a role its method allows.
    Required,
}

/// Who may scrape `/metrics` with `--auth required`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsAccess {
    /// A valid bearer token (any role) is needed: Prometheus sends one
    /// (`authorization.credentials_file`).
    #[default]
    Token,
    /// Anyone may scrape; without a token, tenant-identifying label values are redacted
    /// (unless `--auth-metrics-show-tenants`).
    Open,
}

/// Authentication settings (README "Security").
#[derive(Clone, Debug, clap::Args)]
pub struct AuthArgs {
    /// `off` (default: every caller is an admin) or `required`.
    #[arg(long = "auth", env = "AGENTMESH_AUTH", value_enum, default_value_t = AuthMode::Off, global = true)]
    pub mode: AuthMode,
    /// File holding the HS256 secret tokens are signed with (at least 32 bytes).
    #[arg(
        long = "auth-hs256-secret-file",
        env = "AGENTMESH_AUTH_HS256_SECRET_FILE",
        global = true
    )]
    pub hs256_secret_file: Option<std::path::PathBuf>,
    /// JWKS file with the RS256/ES256 public keys tokens are signed with (re-read when it
    /// changes).
    #[arg(
        long = "auth-jwks-file",
        env = "AGENTMESH_AUTH_JWKS_FILE",
        global = true
    )]
    pub jwks_file: Option<std::path::PathBuf>,
    /// URL of the issuer's JWKS (`https://id.example.com/.well-known/jwks.json`): fetched
    /// before serving, again every `--auth-jwks-refresh`, and early (at most every 30 s) when
    /// a token names a key not in it.
    #[arg(
        long = "auth-jwks-url",
        env = "AGENTMESH_AUTH_JWKS_URL",
        global = true,
        conflicts_with = "jwks_file"
    )]
    pub jwks_url: Option<String>,
    /// How often the JWKS URL is fetched again.
    #[arg(long = "auth-jwks-refresh", env = "AGENTMESH_AUTH_JWKS_REFRESH", default_value = "5m", value_parser = parse_duration, global = true)]
    pub jwks_refresh: Duration,
    /// Required `iss`.
    #[arg(long = "auth-issuer", env = "AGENTMESH_AUTH_ISSUER", global = true)]
    pub issuer: Option<String>,
    /// Required member of `aud`.
    #[arg(long = "auth-audience", env = "AGENTMESH_AUTH_AUDIENCE", global = true)]
    pub audience: Option<String>,
    /// Clock tolerance for `exp` and `nbf`.
    #[arg(long = "auth-leeway", env = "AGENTMESH_AUTH_LEEWAY", default_value = "30s", value_parser = parse_duration, global = true)]
    pub leeway: Duration,
    /// File holding the token this process presents when it calls other services (a token
    /// with the `service` role; re-read on every new connection is not needed: restart to
    /// rotate).
    #[arg(
        long = "auth-token-file",
        env = "AGENTMESH_AUTH_TOKEN_FILE",
        global = true
    )]
    pub token_file: Option<std::path::PathBuf>,
    /// With `--auth required`, who may scrape the admin port's `/metrics`: `token` (default)
    /// or `open`. `/livez` and `/readyz` are always open.
    #[arg(long = "auth-metrics", env = "AGENTMESH_AUTH_METRICS", value_enum, default_value_t = MetricsAccess::Token, global = true)]
    pub metrics: MetricsAccess,
    /// With `--auth-metrics open`, show tenant-identifying label values (namespaces,
    /// policies) to scrapes without a token too.
    #[arg(
        long = "auth-metrics-show-tenants",
        env = "AGENTMESH_AUTH_METRICS_SHOW_TENANTS",
        global = true
    )]
    pub metrics_show_tenants: bool,
    /// TOML file overriding who may call which RPC: `"<package.Service>/<Method>" =
    /// ["operator", …]` (README "Security"); read at start.
    #[arg(
        long = "auth-roles-file",
        env = "AGENTMESH_AUTH_ROLES_FILE",
        global = true
    )]
    pub roles_file: Option<std::path::PathBuf>,
}

impl ClusterArgs {
    /// TLS to etcd, when a CA or client certificate is given.
    ///
    /// # Errors
    /// A file cannot be read.
    pub fn etcd_tls(&self) -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
        if self.etcd_ca_file.is_none() && self.etcd_cert_file.is_none() {
            return Ok(None);
        }
        let read = |path: &std::path::Path, flag: &str| {
            std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
        };
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &self.etcd_ca_file {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(
                ca,
                "--etcd-ca-file",
            )?));
        }
        if let (Some(cert), Some(key)) = (&self.etcd_cert_file, &self.etcd_key_file) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read(cert, "--etcd-cert-file")?,
                read(key, "--etcd-key-file")?,
            ));
        }
        Ok(Some(tls))
    }
}

impl AuthArgs {
    /// How the admin port's `/metrics` is guarded.
    #[must_use]
    pub fn admin_access(&self) -> crate::server::AdminAccess {
        match (self.mode, self.metrics) {
            (AuthMode::Off, _) => crate::server::AdminAccess::default(),
            (AuthMode::Required, MetricsAccess::Token) => crate::server::AdminAccess {
                require_token: true,
                redact_anonymous: true,
            },
            (AuthMode::Required, MetricsAccess::Open) => crate::server::AdminAccess {
                require_token: false,
                redact_anonymous: !self.metrics_show_tenants,
            },
        }
    }

    /// The roles file's overrides, checked against the RPCs served (`known`).
    ///
    /// # Errors
    /// One line naming the file and what is wrong.
    pub fn role_overrides(
        &self,
        known: &[(String, &'static [crate::auth::AccessRule])],
    ) -> Result<Vec<(String, Vec<crate::auth::Role>)>, String> {
        let Some(path) = &self.roles_file else {
            return Ok(Vec::new());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--auth-roles-file {}: {e}", path.display()))?;
        crate::auth::parse_overrides(&text, known)
            .map_err(|e| format!("--auth-roles-file {}: {e}", path.display()))
    }

    /// The verifier (None with `--auth off`).
    ///
    /// # Errors
    /// One line naming the setting and the fix.
    pub fn verifier(
        &self,
        client_certificates: bool,
    ) -> Result<Option<std::sync::Arc<crate::auth::Verifier>>, String> {
        if self.mode == AuthMode::Off {
            return Ok(None);
        }
        let hs256_secret = match &self.hs256_secret_file {
            Some(path) => {
                let secret = std::fs::read(path)
                    .map_err(|e| format!("--auth-hs256-secret-file {}: {e}", path.display()))?;
                let secret = secret.trim_ascii().to_vec();
                if secret.len() < 32 {
                    return Err(format!(
                        "--auth-hs256-secret-file {}: the secret must be at least 32 bytes",
                        path.display()
                    ));
                }
                Some(secret)
            }
            None => None,
        };
        crate::auth::Verifier::new(crate::auth::VerifierConfig {
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            hs256_secret,
            jwks_file: self.jwks_file.clone(),
            jwks_url: self.jwks_url.is_some(),
            leeway: self.leeway,
            certificates_only: client_certificates,
        })
        .map(|v| Some(std::sync::Arc::new(v)))
        .map_err(|e| format!("--auth required: {e}"))
    }

    /// The token this process sends to other services, if given.
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn client_token(&self) -> Result<Option<std::sync::Arc<str>>, String> {
        match &self.token_file {
            Some(path) => {
                let token = std::fs::read_to_string(path)
                    .map_err(|e| format!("--auth-token-file {}: {e}", path.display()))?;
                Ok(Some(std::sync::Arc::from(token.trim())))
            }
            None => Ok(None),
        }
    }
}

/// Logging and tracing settings.
#[derive(Clone, Debug, clap::Args)]
pub struct TelemetryArgs {
    /// Log format: text or json.
    #[arg(long, env = "AGENTMESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter in tracing's EnvFilter syntax (`info`, `agentmesh_ratelimit=debug`).
    #[arg(long, env = "AGENTMESH_LOG", default_value = "info", global = true)]
    pub log_filter: String,
    /// OTLP/gRPC endpoint for traces (`http://collector:4317`); unset = no export. The other
    /// standard `OTEL_*` variables (`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, …) apply too.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// Service name reported in traces.
    #[arg(
        long,
        env = "OTEL_SERVICE_NAME",
        default_value = "agentmesh",
        global = true
    )]
    pub otel_service_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_durations_accept_the_documented_forms() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(
            parse_duration("ten seconds")
                .unwrap_err()
                .contains("expected a duration")
        );
    }

    #[test]
    fn test_socket_addr_error_names_the_format() {
        assert!(
            parse_socket_addr("localhost")
                .unwrap_err()
                .contains("host:port")
        );
        assert_eq!(parse_socket_addr("127.0.0.1:7104").unwrap().port(), 7104);
    }
}
