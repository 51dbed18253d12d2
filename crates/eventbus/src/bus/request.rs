//! Request/reply: a request published with an `_INBOX.` reply subject answered in memory.

use super::*;

impl Bus {
    /// Publishes `event` with a fresh reply subject and waits up to `timeout` for one reply.
    ///
    /// # Errors
    /// `NoResponders` when no group is interested; `Timeout`; as [`Bus::publish`].
    pub async fn request(
        &self,
        event: Event,
        timeout: Duration,
    ) -> Result<(Event, String), EventBusError> {
        let (mut event, generated) = self.prepare(event, "event")?;
        if !self.anyone_interested(&event.subject) {
            return Err(EventBusError::NoResponders(event.subject));
        }
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let inbox = format!("{INBOX_PREFIX}{}.{n}", self.inner.inbox_token);
        let (tx, rx) = oneshot::channel();
        self.inner.inboxes.lock().insert(inbox.clone(), tx);
        event.reply_to.clone_from(&inbox);
        if event.correlation_id.is_empty() {
            event.correlation_id.clone_from(&event.id);
        }
        let published = self.publish_prepared(event, generated).await;
        let result = match published {
            Err(e) => Err(e),
            Ok(_) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(_)) | Err(_) => Err(EventBusError::Timeout(timeout)),
            },
        };
        self.inner.inboxes.lock().remove(&inbox);
        result
    }
}
