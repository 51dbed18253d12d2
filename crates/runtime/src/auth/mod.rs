//! Authentication and authorisation: who a caller is (a verified bearer JWT, [`verify`]), what
//! a role may call ([`access`]: each service's rules, declared next to its RPCs, enforced on
//! every call by the server stack's [`AuthLayer`]), and what names a caller may use
//! ([`scope`]: tenants, `sys.` subjects, agent identity, checked by the handlers).

pub mod access;
pub mod layer;
pub mod scope;
pub mod verify;

#[cfg(test)]
mod tests;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use access::{AccessRule, allowed, allowed_roles, assert_covered, parse_overrides, uncovered};
pub use layer::AuthLayer;
pub use scope::caller;
pub use verify::{Identity, TokenError, Verifier, VerifierConfig};

/// What a caller may be. An identity may hold several roles; `Admin` may call everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// An agent: registers, heartbeats, takes tasks and reports results as its own agent id.
    Agent,
    /// A service calling the data APIs (checks, publishes, cache reads and writes, submits).
    Service,
    /// An operator: drains, maintenance, policies, dead letters, silences.
    Operator,
    /// Everything, across tenants.
    Admin,
}

impl Role {
    /// Every role.
    pub const ALL: [Self; 4] = [Self::Agent, Self::Service, Self::Operator, Self::Admin];

    /// Lower-case name, as in tokens (`"roles": ["service"]`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Service => "service",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    /// The role a name means (case-insensitive).
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(name))
    }
}

/// What a development token says (`meshctl token issue`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TokenClaims {
    /// Subject.
    pub sub: String,
    /// Issuer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Not before, seconds since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at.
    pub iat: u64,
    /// Tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Roles.
    pub roles: Vec<String>,
    /// The agent id an agent acts as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
}

impl TokenClaims {
    /// Claims for `sub` with `roles`, valid from now for `ttl`.
    #[must_use]
    pub fn new(sub: &str, roles: &[Role], ttl: Duration) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Self {
            sub: sub.to_owned(),
            exp: now + ttl.as_secs(),
            iat: now,
            roles: roles.iter().map(|r| r.as_str().to_owned()).collect(),
            ..Self::default()
        }
    }
}

/// Signs `claims` with an HS256 secret (development tokens; production tokens come from the
/// identity provider).
///
/// # Errors
/// When the claims cannot be encoded.
pub fn issue_hs256(secret: &[u8], claims: &TokenClaims) -> Result<String, String> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .map_err(|e| e.to_string())
}
