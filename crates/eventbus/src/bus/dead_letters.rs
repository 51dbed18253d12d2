//! Dead-letter administration: listing, redriving and purging dead letters.

use super::*;

impl Bus {
    /// Dead letters stored under `subject`, from `from_sequence` (0 = oldest), at most `limit`.
    ///
    /// # Errors
    /// `Unavailable` when the store is down.
    pub async fn dead_letters(
        &self,
        subject: &str,
        from_sequence: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, EventBusError> {
        let from = if from_sequence == 0 {
            StartPosition::All
        } else {
            StartPosition::Sequence(from_sequence)
        };
        let stored = self.inner.log.read_range(subject, &from, limit).await?;
        Ok(stored
            .into_iter()
            .map(|s| {
                let mut event = s.event;
                let header =
                    |event: &mut Event, name: &str| event.headers.remove(name).unwrap_or_default();
                let reason = header(&mut event, DEAD_LETTER_REASON);
                let original = header(&mut event, DEAD_LETTER_SUBJECT);
                let deliveries = header(&mut event, DEAD_LETTER_DELIVERIES)
                    .parse()
                    .unwrap_or(0);
                let group = header(&mut event, DEAD_LETTER_GROUP);
                let dead_at_ms = header(&mut event, DEAD_LETTER_AT)
                    .parse()
                    .unwrap_or(s.stored_at_ms);
                if !original.is_empty() {
                    event.subject = original;
                }
                let original_id = header(&mut event, DEAD_LETTER_ID);
                if !original_id.is_empty() {
                    event.id = original_id;
                }
                DeadLetter {
                    sequence: s.sequence,
                    event,
                    reason,
                    deliveries,
                    group,
                    dead_at_ms,
                }
            })
            .collect())
    }

    /// Publishes dead letters again (to `to_subject`, else their original subject) with fresh
    /// ids, then removes them. Empty `sequences` = the oldest `limit`.
    ///
    /// # Errors
    /// `Unavailable` when the store is down; as [`Bus::publish`] for `to_subject`.
    pub async fn redrive(
        &self,
        subject: &str,
        sequences: &[u64],
        to_subject: Option<&str>,
        limit: usize,
    ) -> Result<u64, EventBusError> {
        let chosen = self.select_dead(subject, sequences, limit).await?;
        if !sequences.is_empty() && chosen.is_empty() {
            return Err(EventBusError::NotFound(format!(
                "no dead letter with those sequences under {subject}"
            )));
        }
        let mut done = Vec::new();
        let mut redriven = 0;
        for d in chosen {
            let mut event = d.event;
            if let Some(to) = to_subject {
                to.clone_into(&mut event.subject);
            }
            let original_id = std::mem::replace(&mut event.id, new_ulid(now_ms()));
            event.headers.insert(REDRIVEN_FROM.into(), original_id);
            self.publish(event).await?;
            redriven += 1;
            done.push(d.sequence);
            if done.len() >= 100 {
                self.inner.log.delete(subject, &done).await?;
                done.clear();
            }
        }
        if !done.is_empty() {
            self.inner.log.delete(subject, &done).await?;
        }
        Ok(redriven)
    }

    /// Deletes dead letters (empty `sequences` = all).
    ///
    /// # Errors
    /// `Unavailable` when the store is down.
    pub async fn purge(&self, subject: &str, sequences: &[u64]) -> Result<u64, EventBusError> {
        if !sequences.is_empty() {
            return self.inner.log.delete(subject, sequences).await;
        }
        let mut total = 0;
        loop {
            let batch = self
                .inner
                .log
                .read_range(subject, &StartPosition::All, crate::log::MAX_BATCH)
                .await?;
            if batch.is_empty() {
                return Ok(total);
            }
            let seqs: Vec<u64> = batch.iter().map(|s| s.sequence).collect();
            total += self.inner.log.delete(subject, &seqs).await?;
        }
    }

    pub(super) async fn select_dead(
        &self,
        subject: &str,
        sequences: &[u64],
        limit: usize,
    ) -> Result<Vec<DeadLetter>, EventBusError> {
        if sequences.is_empty() {
            return self.dead_letters(subject, 0, limit).await;
        }
        let first = sequences.iter().copied().min().unwrap_or(0);
        let wanted: std::collections::HashSet<u64> = sequences.iter().copied().collect();
        let mut out = Vec::new();
        let mut from = first;
        while out.len() < wanted.len() {
            let batch = self
                .dead_letters(subject, from.max(1), crate::log::MAX_BATCH)
                .await?;
            let Some(last) = batch.last().map(|d| d.sequence) else {
                break;
            };
            out.extend(batch.into_iter().filter(|d| wanted.contains(&d.sequence)));
            from = last + 1;
        }
        Ok(out)
    }
}
