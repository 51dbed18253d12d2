//! The one error type of the membership crate.

/// Why a membership operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The membership backend (etcd) is down, unreachable or did not answer in time.
    #[error("membership backend unavailable: {0}")]
    Unavailable(String),
    /// The member (or service name) given by the caller is not acceptable.
    #[error("invalid member: {0}")]
    InvalidMember(String),
    /// The membership configuration is not usable.
    #[error("invalid membership configuration: {0}")]
    InvalidConfig(String),
    /// A member could not be encoded to (or decoded from) its stored JSON form.
    #[error("member encoding failed: {0}")]
    Encoding(String),
}

impl From<etcd_client::Error> for MembershipError {
    fn from(error: etcd_client::Error) -> Self {
        match error {
            etcd_client::Error::InvalidArgs(msg) => Self::InvalidConfig(msg),
            etcd_client::Error::InvalidUri(e) => {
                Self::InvalidConfig(format!("invalid etcd endpoint: {e}"))
            }
            other => Self::Unavailable(format!("etcd: {other}")),
        }
    }
}

impl From<serde_json::Error> for MembershipError {
    fn from(error: serde_json::Error) -> Self {
        Self::Encoding(error.to_string())
    }
}
