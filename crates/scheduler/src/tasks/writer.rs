//! Writes task changes to the store behind the manager's back, in order and coalesced: the
//! manager marks a task changed (under its lock, never waiting); one writer task takes every
//! task marked since its last write and writes their latest states in one call. A task
//! changed ten times between two writes is written once. When the store fails, what was not
//! written is kept (unless a newer state replaced it) and tried again.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::model::Task;
use super::store::TaskStore;

/// Wait before writing again after the store failed.
const RETRY: Duration = Duration::from_millis(250);

/// Changed tasks not written yet.
pub(super) struct Writer {
    dirty: Mutex<HashMap<String, Task>>,
    wake: Notify,
}

impl Writer {
    /// Starts the writer task; it ends when the returned handle is dropped.
    pub(super) fn start(store: Arc<dyn TaskStore>, retention: Duration) -> Arc<Self> {
        let writer = Arc::new(Self {
            dirty: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        });
        tokio::spawn(run(Arc::downgrade(&writer), store, retention));
        writer
    }

    /// Marks `task` changed (its latest state replaces one not yet written).
    pub(super) fn mark(&self, task: &Task) {
        self.dirty.lock().insert(task.id.clone(), task.clone());
        self.wake.notify_one();
    }
}

async fn run(writer: Weak<Writer>, store: Arc<dyn TaskStore>, retention: Duration) {
    loop {
        let batch: Vec<Task> = {
            let Some(w) = writer.upgrade() else {
                return;
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), w.wake.notified()).await;
            std::mem::take(&mut *w.dirty.lock()).into_values().collect()
        };
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = store.put(&batch, retention).await {
            tracing::warn!(error = %e, tasks = batch.len(), "writing task changes failed; retrying");
            let Some(w) = writer.upgrade() else {
                return;
            };
            {
                let mut dirty = w.dirty.lock();
                for task in batch {
                    dirty.entry(task.id.clone()).or_insert(task);
                }
            }
            tokio::time::sleep(RETRY).await;
            w.wake.notify_one();
        }
    }
}
