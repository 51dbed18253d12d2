//! Encryption in transit (README "Security"): TLS on every gRPC port of a process, the same
//! settings for every client it opens (peers, event publishing, meshctl), and optionally
//! mutual TLS, where a verified client certificate's SPIFFE-style URI SAN stands in for a
//! bearer token.
//!
//! A client certificate names its caller with a URI SAN
//! `spiffe://<trust domain>[/tenant/<tenant>]/<role>[+<role>…]/<subject>`, for example
//! `spiffe://agentmesh/service+operator/scheduler-1` or
//! `spiffe://agentmesh/tenant/acme/agent/agent-7` (an agent's subject is its agent id). The
//! trust domain must be `--tls-trust-domain` (default `agentmesh`). A bearer token, when a call
//! carries one, wins over the certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use tonic::transport::{Certificate, ClientTlsConfig, ServerTlsConfig};

use crate::auth::{Identity, Role};

/// Whether the gRPC ports ask clients for certificates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientAuth {
    /// No client certificates (TLS encrypts; tokens authenticate).
    #[default]
    None,
    /// A client may present a certificate signed by `--tls-ca-file`.
    Optional,
    /// Every client must present a certificate signed by `--tls-ca-file` (mutual TLS).
    Required,
}

/// TLS settings (README "Security").
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain this process presents: on its gRPC ports (turning TLS on) and,
    /// to servers that ask, as its client certificate. Needs `--tls-key-file`.
    #[arg(
        long = "tls-cert-file",
        env = "AGENTMESH_TLS_CERT_FILE",
        global = true,
        requires = "key_file"
    )]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `--tls-cert-file`.
    #[arg(
        long = "tls-key-file",
        env = "AGENTMESH_TLS_KEY_FILE",
        global = true,
        requires = "cert_file"
    )]
    pub key_file: Option<PathBuf>,
    /// PEM CA bundle: the servers this process calls must be signed by it (calls then use
    /// TLS), and so must client certificates with `--tls-client-auth`.
    #[arg(long = "tls-ca-file", env = "AGENTMESH_TLS_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Client certificates on the gRPC ports: none (default), optional or required (mutual
    /// TLS; needs `--tls-ca-file`).
    #[arg(long = "tls-client-auth", env = "AGENTMESH_TLS_CLIENT_AUTH", value_enum, default_value_t = ClientAuth::None, global = true)]
    pub client_auth: ClientAuth,
    /// The SPIFFE trust domain client certificates' URI SANs must name.
    #[arg(
        long = "tls-trust-domain",
        env = "AGENTMESH_TLS_TRUST_DOMAIN",
        default_value = "agentmesh",
        global = true
    )]
    pub trust_domain: String,
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

impl TlsArgs {
    /// The gRPC ports' TLS (None: plaintext).
    ///
    /// # Errors
    /// A file cannot be read, or client certificates are asked for without a CA.
    pub fn server(&self) -> Result<Option<ServerTlsConfig>, String> {
        let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) else {
            if self.client_auth != ClientAuth::None {
                return Err(
                    "--tls-client-auth needs TLS: give --tls-cert-file and --tls-key-file"
                        .to_owned(),
                );
            }
            return Ok(None);
        };
        let identity = tonic::transport::Identity::from_pem(
            read(cert, "--tls-cert-file")?,
            read(key, "--tls-key-file")?,
        );
        let mut config = ServerTlsConfig::new().identity(identity);
        if self.client_auth != ClientAuth::None {
            let ca = self.ca_file.as_ref().ok_or_else(|| {
                "--tls-client-auth needs --tls-ca-file (the CA client certificates are signed by)"
                    .to_owned()
            })?;
            config = config
                .client_ca_root(Certificate::from_pem(read(ca, "--tls-ca-file")?))
                .client_auth_optional(self.client_auth == ClientAuth::Optional);
        }
        Ok(Some(config))
    }

    /// The TLS of every client this process opens (None: plaintext): the CA servers must be
    /// signed by, and this process's certificate for servers that ask for one.
    ///
    /// # Errors
    /// A file cannot be read.
    pub fn client(&self) -> Result<Option<ClientTlsConfig>, String> {
        let Some(ca) = &self.ca_file else {
            return Ok(None);
        };
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(ca, "--tls-ca-file")?));
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            config = config.identity(tonic::transport::Identity::from_pem(
                read(cert, "--tls-cert-file")?,
                read(key, "--tls-key-file")?,
            ));
        }
        Ok(Some(config))
    }

    /// The admin port's TLS (the same certificate; no client certificates: `/metrics` takes a
    /// token), when `--tls-cert-file` is given.
    ///
    /// # Errors
    /// A file cannot be read or holds no certificate or key.
    pub fn admin(&self) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) else {
            return Ok(None);
        };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read(cert, "--tls-cert-file")?)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("--tls-cert-file {}: {e}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_slice(&read(key, "--tls-key-file")?)
            .map_err(|e| format!("--tls-key-file {}: {e}", key.display()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("--tls-cert-file/--tls-key-file: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(Arc::new(config)))
    }

    /// Whether client certificates can authenticate callers here.
    #[must_use]
    pub fn client_certificates(&self) -> bool {
        self.client_auth != ClientAuth::None
    }
}

/// Installs rustls's ring provider as the process default (Redis over `rediss://` builds its
/// TLS configuration from the default); call once at start. Harmless when one is installed.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

static CLIENT_TLS: OnceLock<ClientTlsConfig> = OnceLock::new();
static HTTPS_CLIENT: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

/// Sets the TLS every client of this process uses (once, at start; later calls are ignored).
pub fn set_client_tls(config: ClientTlsConfig) {
    let _ = CLIENT_TLS.set(config);
}

/// The TLS of this process's HTTPS reads of admin ports (`/metrics`), if set.
#[must_use]
pub fn https_client() -> Option<Arc<rustls::ClientConfig>> {
    HTTPS_CLIENT.get().cloned()
}

/// The TLS of an `https://` read (a JWKS URL): the system's roots (or `SSL_CERT_FILE`) and
/// the process's CA.
#[must_use]
pub fn https_public() -> Arc<rustls::ClientConfig> {
    static PUBLIC: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    PUBLIC
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            for cert in PROCESS_CA.get().into_iter().flatten() {
                let _ = roots.add(cert.clone());
            }
            Arc::new(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
            )
        })
        .clone()
}

/// The process's CA certificates (`--tls-ca-file`), once installed.
static PROCESS_CA: OnceLock<Vec<rustls::pki_types::CertificateDer<'static>>> = OnceLock::new();

impl TlsArgs {
    /// Sets this process's client TLS (gRPC and admin reads) from these settings, if a CA is
    /// given; once, at start.
    ///
    /// # Errors
    /// A file cannot be read or holds no certificate.
    pub fn install_client(&self) -> Result<(), String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let Some(grpc) = self.client()? else {
            return Ok(());
        };
        set_client_tls(grpc);
        let Some(ca) = &self.ca_file else {
            return Ok(());
        };
        let mut roots = rustls::RootCertStore::empty();
        let mut certs = Vec::new();
        for cert in CertificateDer::pem_slice_iter(&read(ca, "--tls-ca-file")?) {
            let cert = cert.map_err(|e| format!("--tls-ca-file {}: {e}", ca.display()))?;
            certs.push(cert.clone());
            roots
                .add(cert)
                .map_err(|e| format!("--tls-ca-file {}: {e}", ca.display()))?;
        }
        let _ = PROCESS_CA.set(certs);
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let _ = HTTPS_CLIENT.set(Arc::new(config));
        Ok(())
    }
}

/// The TLS every client of this process uses, if set.
#[must_use]
pub fn client_tls() -> Option<&'static ClientTlsConfig> {
    CLIENT_TLS.get()
}

/// The identity a client certificate (DER) names through its URI SAN, if it names one in
/// `trust_domain`.
///
/// # Errors
/// Why the certificate names no caller (the message goes back with UNAUTHENTICATED).
pub fn certificate_identity(der: &[u8], trust_domain: &str) -> Result<Identity, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("the client certificate cannot be read: {e}"))?;
    let expires_at = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let mut last = None;
    for uri in &uris {
        match spiffe_identity(uri, trust_domain) {
            Ok(mut identity) => {
                identity.expires_at = expires_at;
                return Ok(identity);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        format!("the client certificate has no URI SAN spiffe://{trust_domain}/<role>/<subject>")
    }))
}

/// The identity a SPIFFE-style URI names (see the module docs).
///
/// # Errors
/// Why it names none.
pub fn spiffe_identity(uri: &str, trust_domain: &str) -> Result<Identity, String> {
    let shape = || {
        format!(
            "{uri:?}: expected spiffe://{trust_domain}[/tenant/<tenant>]/<role>[+<role>]/<subject>"
        )
    };
    let rest = uri.strip_prefix("spiffe://").ok_or_else(shape)?;
    let (domain, path) = rest.split_once('/').ok_or_else(shape)?;
    if domain != trust_domain {
        return Err(format!(
            "{uri:?}: trust domain {domain:?} is not {trust_domain:?}"
        ));
    }
    let mut parts: Vec<&str> = path.split('/').collect();
    let tenant = if parts.first() == Some(&"tenant") && parts.len() == 4 {
        let tenant = parts[1].to_owned();
        parts.drain(..2);
        if !crate::auth::verify::valid_tenant(&tenant) {
            return Err(format!("{uri:?}: {tenant:?} cannot name a tenant"));
        }
        Some(tenant)
    } else {
        None
    };
    let [roles, subject] = parts.as_slice() else {
        return Err(shape());
    };
    if subject.is_empty() {
        return Err(shape());
    }
    let roles: std::collections::BTreeSet<Role> = roles
        .split('+')
        .map(|r| Role::parse(r).ok_or_else(|| format!("{uri:?}: {r:?} is not a role")))
        .collect::<Result<_, _>>()?;
    let agent_id = roles.contains(&Role::Agent).then(|| (*subject).to_owned());
    Ok(Identity {
        subject: (*subject).to_owned(),
        tenant,
        roles,
        agent_id,
        expires_at: 0,
    })
}

/// Client-certificate identities, parsed once per certificate.
#[derive(Default)]
pub struct CertificateIdentities {
    trust_domain: String,
    cache: parking_lot::Mutex<std::collections::HashMap<Vec<u8>, Arc<Identity>>>,
}

/// Most certificates remembered.
const CERT_CACHE: usize = 10_000;

impl CertificateIdentities {
    /// Identities of certificates in `trust_domain`.
    #[must_use]
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            cache: parking_lot::Mutex::default(),
        }
    }

    /// The identity `der` names (cached).
    ///
    /// # Errors
    /// As [`certificate_identity`].
    pub fn identity(&self, der: &[u8]) -> Result<Arc<Identity>, String> {
        if let Some(identity) = self.cache.lock().get(der) {
            return Ok(identity.clone());
        }
        let identity = Arc::new(certificate_identity(der, &self.trust_domain)?);
        let mut cache = self.cache.lock();
        if cache.len() >= CERT_CACHE {
            cache.clear();
        }
        cache.insert(der.to_vec(), identity.clone());
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_spiffe_uris_name_roles_subject_tenant_and_agent() {
        let i = spiffe_identity(
            "spiffe://agentmesh/service+operator/scheduler-1",
            "agentmesh",
        )
        .unwrap();
        assert_eq!(i.subject, "scheduler-1");
        assert_eq!(
            i.roles,
            [Role::Service, Role::Operator].into_iter().collect()
        );
        assert_eq!(i.tenant, None);
        let a =
            spiffe_identity("spiffe://agentmesh/tenant/acme/agent/agent-7", "agentmesh").unwrap();
        assert_eq!(
            (a.tenant.as_deref(), a.agent_id.as_deref()),
            (Some("acme"), Some("agent-7"))
        );
        for (uri, says) in [
            ("spiffe://other/service/x", "trust domain"),
            ("spiffe://agentmesh/root/x", "not a role"),
            ("spiffe://agentmesh/service", "expected"),
            ("https://agentmesh/service/x", "expected"),
            (
                "spiffe://agentmesh/tenant/sys/service/x",
                "cannot name a tenant",
            ),
        ] {
            let e = spiffe_identity(uri, "agentmesh").unwrap_err();
            assert!(e.contains(says), "{uri}: {e}");
        }
    }
}
