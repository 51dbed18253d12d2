//! Bearer-token verification: JWTs signed with HS256 (a shared secret, for small setups) or
//! RS256/ES256 (public keys from a JWKS file, re-read when it changes so keys rotate without a
//! restart), checked for issuer, audience, expiry and not-before with a small leeway. A verified
//! token's identity is cached by the token's hash until the token expires, so a busy caller does
//! not pay the signature check per call.

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::{Mutex, RwLock};
use serde::Deserialize;

use super::Role;

/// Most verified tokens remembered.
pub const CACHE_ENTRIES: usize = 10_000;

/// Why a token was refused (the caller sees the message with UNAUTHENTICATED).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No `authorization: Bearer …` metadata.
    #[error("no bearer token: send `authorization: Bearer <JWT>`")]
    Missing,
    /// Not a JWT, a bad signature, an unknown key or algorithm.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Past `exp` (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// Before `nbf` (beyond the leeway).
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("token issuer is not {0:?}")]
    WrongIssuer(String),
    /// `aud` does not include the configured audience.
    #[error("token audience does not include {0:?}")]
    WrongAudience(String),
}

/// Who a verified token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `sub`.
    pub subject: String,
    /// `tenant`: the namespace prefix the caller owns; `None` for a cluster-wide caller.
    pub tenant: Option<String>,
    /// `roles` (unknown names are ignored).
    pub roles: BTreeSet<Role>,
    /// `agent_id`: the only agent id an agent's token may act as.
    pub agent_id: Option<String>,
    /// `exp`, seconds since the epoch (0: never, with auth off).
    pub expires_at: u64,
}

impl Identity {
    /// The identity every call has with `--auth off`: an admin of every tenant.
    #[must_use]
    pub fn anonymous_admin() -> Self {
        Self {
            subject: "anonymous".to_owned(),
            tenant: None,
            roles: [Role::Admin].into(),
            agent_id: None,
            expires_at: 0,
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    exp: u64,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    agent_id: Option<String>,
}

/// How tokens are checked.
#[derive(Debug, Clone, Default)]
pub struct VerifierConfig {
    /// Expected `iss`; `None` accepts any.
    pub issuer: Option<String>,
    /// Expected member of `aud`; `None` accepts any.
    pub audience: Option<String>,
    /// HS256 secret.
    pub hs256_secret: Option<Vec<u8>>,
    /// JWKS file with RS256/ES256 public keys (by `kid`).
    pub jwks_file: Option<PathBuf>,
    /// Keys come from a JWKS URL: the host fetches the document ([`Verifier::set_jwks`])
    /// before serving and again on a schedule.
    pub jwks_url: bool,
    /// Clock tolerance for `exp` and `nbf`.
    pub leeway: Duration,
    /// No key source is needed: callers authenticate with client certificates (mutual TLS)
    /// and every token is refused.
    pub certificates_only: bool,
}

/// Keys by `kid`, and the file's modification time when read.
type KeysRead = (
    HashMap<String, (DecodingKey, Algorithm)>,
    Option<SystemTime>,
);

struct Keys {
    by_kid: HashMap<String, (DecodingKey, Algorithm)>,
    /// The file's modification time when read.
    read_at: Option<SystemTime>,
}

/// Verifies bearer tokens; cheap to share.
pub struct Verifier {
    config: VerifierConfig,
    keys: RwLock<Keys>,
    cache: Mutex<HashMap<u64, Arc<Identity>>>,
    hasher: std::collections::hash_map::RandomState,
    /// A token named an unknown `kid`.
    unknown_key: std::sync::atomic::AtomicBool,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Whether `tenant` can name a tenant: one subject token (so `<tenant>.>` is its own subject
/// space), and never `sys` (the cluster's own subjects).
#[must_use]
pub fn valid_tenant(tenant: &str) -> bool {
    (1..=64).contains(&tenant.len())
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        && tenant != "sys"
}

fn read_jwks(path: &PathBuf) -> Result<KeysRead, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let by_kid = parse_jwks(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((by_kid, modified))
}

/// The RS256/ES256 keys of a JWKS document, by `kid`.
fn parse_jwks(text: &str) -> Result<HashMap<String, (DecodingKey, Algorithm)>, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut by_kid = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else {
            return Err("every key needs a \"kid\"".to_owned());
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid:?}: {e}"))?;
        let algorithm = match &jwk.algorithm {
            jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
            jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
            _ => {
                return Err(format!(
                    "key {kid:?}: only RSA (RS256) and EC P-256 (ES256) keys"
                ));
            }
        };
        by_kid.insert(kid, (key, algorithm));
    }
    Ok(by_kid)
}

impl Verifier {
    /// A verifier; reads the JWKS file now.
    ///
    /// # Errors
    /// The JWKS file cannot be read or parsed, or no key source is configured.
    pub fn new(config: VerifierConfig) -> Result<Self, String> {
        if config.hs256_secret.is_none()
            && config.jwks_file.is_none()
            && !config.jwks_url
            && !config.certificates_only
        {
            return Err(
                "auth required: give --auth-hs256-secret-file or --auth-jwks-file (or client \
                 certificates: --tls-client-auth required)"
                    .to_owned(),
            );
        }
        let (by_kid, read_at) = match &config.jwks_file {
            Some(path) => read_jwks(path)?,
            None => (HashMap::new(), None),
        };
        Ok(Self {
            config,
            keys: RwLock::new(Keys { by_kid, read_at }),
            cache: Mutex::new(HashMap::new()),
            hasher: std::collections::hash_map::RandomState::new(),
            unknown_key: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Re-reads the JWKS file if it changed since it was read (keys rotate without a
    /// restart). Keeps the old keys when the new file is broken.
    ///
    /// # Errors
    /// The new file cannot be used (the old keys stay).
    pub fn refresh(&self) -> Result<bool, String> {
        let Some(path) = &self.config.jwks_file else {
            return Ok(false);
        };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified == self.keys.read().read_at {
            return Ok(false);
        }
        let (by_kid, read_at) = read_jwks(path)?;
        *self.keys.write() = Keys { by_kid, read_at };
        // A removed key must stop working at once.
        self.cache.lock().clear();
        Ok(true)
    }

    /// Replaces the keys with those of a JWKS document (fetched from `--auth-jwks-url`);
    /// keeps the old keys when it is unusable. Verified tokens are forgotten, so a removed
    /// key stops working at once.
    ///
    /// # Errors
    /// The document is not a usable JWKS.
    pub fn set_jwks(&self, text: &str) -> Result<usize, String> {
        let by_kid = parse_jwks(text)?;
        let count = by_kid.len();
        *self.keys.write() = Keys {
            by_kid,
            read_at: None,
        };
        self.cache.lock().clear();
        Ok(count)
    }

    /// Whether a token named a key this verifier does not have since the last call (a JWKS
    /// URL's host then fetches the document early: keys are rotated at the issuer).
    #[must_use]
    pub fn take_unknown_key(&self) -> bool {
        self.unknown_key
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// The identity a token names.
    ///
    /// # Errors
    /// Why the token is refused.
    pub fn verify(&self, token: &str) -> Result<Arc<Identity>, TokenError> {
        let mut hasher = self.hasher.build_hasher();
        hasher.write(token.as_bytes());
        let key = hasher.finish();
        let now = now_secs();
        let leeway = self.config.leeway.as_secs();
        if let Some(identity) = self.cache.lock().get(&key).cloned()
            && (identity.expires_at == 0 || now <= identity.expires_at + leeway)
        {
            return Ok(identity);
        }
        let identity = Arc::new(self.verify_uncached(token)?);
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, id| id.expires_at + leeway >= now);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(key, identity.clone());
        Ok(identity)
    }

    fn verify_uncached(&self, token: &str) -> Result<Identity, TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let keys = self.keys.read();
        let hs;
        let (key, algorithm) = match header.alg {
            Algorithm::HS256 => {
                let secret = self.config.hs256_secret.as_ref().ok_or_else(|| {
                    TokenError::Invalid("HS256 tokens are not accepted here".to_owned())
                })?;
                hs = DecodingKey::from_secret(secret);
                (&hs, Algorithm::HS256)
            }
            Algorithm::RS256 | Algorithm::ES256 => {
                let kid = header.kid.as_ref().ok_or_else(|| {
                    TokenError::Invalid("the token names no key (kid)".to_owned())
                })?;
                let Some((key, algorithm)) = keys.by_kid.get(kid) else {
                    self.unknown_key
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err(TokenError::Invalid(format!("unknown key {kid:?}")));
                };
                if *algorithm != header.alg {
                    return Err(TokenError::Invalid(format!(
                        "key {kid:?} is not for {:?}",
                        header.alg
                    )));
                }
                (key, *algorithm)
            }
            other => {
                return Err(TokenError::Invalid(format!(
                    "algorithm {other:?} is not accepted"
                )));
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.config.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &self.config.issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        match &self.config.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidIssuer => {
                    TokenError::WrongIssuer(self.config.issuer.clone().unwrap_or_default())
                }
                ErrorKind::InvalidAudience => {
                    TokenError::WrongAudience(self.config.audience.clone().unwrap_or_default())
                }
                _ => TokenError::Invalid(e.to_string()),
            }
        })?;
        let claims = data.claims;
        if let Some(tenant) = claims.tenant.as_deref().filter(|t| !t.is_empty())
            && !valid_tenant(tenant)
        {
            return Err(TokenError::Invalid(format!(
                "tenant {tenant:?}: a tenant is 1 to 64 bytes of [A-Za-z0-9_-] and not \"sys\""
            )));
        }
        Ok(Identity {
            subject: claims.sub,
            tenant: claims.tenant.filter(|t| !t.is_empty()),
            roles: claims.roles.iter().filter_map(|r| Role::parse(r)).collect(),
            agent_id: claims.agent_id.filter(|a| !a.is_empty()),
            expires_at: claims.exp,
        })
    }
}
