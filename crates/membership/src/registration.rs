//! The handle that keeps one member registered.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;

use crate::{Member, MembershipError};

/// What a backend does when a registration ends. Dropping the handle without calling
/// [`RegistrationHandle::deregister`] is the "abandon" path (etcd: stop the keep-alive and let the
/// lease expire; in-memory: remove at once).
pub(crate) trait RegistrationHandle: Send + Sync + 'static {
    fn deregister(self: Box<Self>) -> BoxFuture<'static, Result<(), MembershipError>>;
}

/// Keeps one member registered, in a background task where the backend needs one.
///
/// Dropping it without [`Registration::deregister`] stops the keep-alive: with etcd the key then
/// expires after the lease TTL; with the in-memory backend (no leases) the member leaves at once.
pub struct Registration {
    member: Member,
    registered: Arc<AtomicBool>,
    handle: Box<dyn RegistrationHandle>,
}

impl Registration {
    pub(crate) fn new(
        member: Member,
        registered: Arc<AtomicBool>,
        handle: Box<dyn RegistrationHandle>,
    ) -> Self {
        Self {
            member,
            registered,
            handle,
        }
    }

    /// The registered member.
    pub fn member(&self) -> &Member {
        &self.member
    }

    /// False while the lease is lost and the member is not yet re-registered under a new one.
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    /// Stops the keep-alive and removes the member at once (etcd: revokes the lease).
    ///
    /// On error (etcd unreachable) the keep-alive is stopped anyway, so the key expires by TTL.
    pub async fn deregister(self) -> Result<(), MembershipError> {
        let Self {
            registered, handle, ..
        } = self;
        registered.store(false, Ordering::Release);
        handle.deregister().await
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("member", &self.member)
            .field("registered", &self.is_registered())
            .finish_non_exhaustive()
    }
}
