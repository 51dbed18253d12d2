//! The feed that keeps every instance's L1 coherent: each change L2 makes (a write, a delete, a
//! lease ending, a tag or namespace invalidation) carries the cluster-wide write sequence number
//! and reaches every instance (Redis pub/sub, or a channel in process).
//!
//! An instance applies changes in order. A sequence number that skips ahead means messages were
//! lost: the instance flushes its L1 rather than serve what it can no longer vouch for. When the
//! feed is lost the instance stops trusting L1 (reads go to L2 first; L1 answers, marked stale,
//! only when L2 cannot); when the feed is back it flushes L1 and carries on from the sequence
//! number L2 reports.
//!
//! Message form (text, one per change): `{seq} {kind} {sent wall ms} {number} {len}:{namespace}
//! {rest}` with no space before `{rest}`; kinds: `k` written (number: the version; rest: the
//! key), `d` deleted (rest: the key), `a` lease abandoned (rest: the key), `t` tags invalidated
//! (rest: lines `{generation} {tag}`), `n` namespace invalidated (number: its new generation).

/// What the feed delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncEvent {
    /// The feed is (re)established; changes after `seq` will follow.
    Synced {
        /// The last sequence number assigned when the feed was established.
        seq: u64,
    },
    /// The feed is lost (changes may be missed until the next `Synced`).
    Lost {
        /// Why, for the log.
        reason: String,
    },
    /// One change.
    Change(Change),
}

/// One change to L2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The cluster-wide write sequence number.
    pub seq: u64,
    /// Wall ms the change was made (for the propagation-lag histogram).
    pub sent_ms: u64,
    /// The namespace changed.
    pub namespace: String,
    /// What changed.
    pub what: What,
}

/// What a change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    /// The key was written (or a lease filled) at this version.
    Written {
        /// The key.
        key: String,
        /// Its new version.
        version: u64,
    },
    /// The key was deleted.
    Deleted {
        /// The key.
        key: String,
    },
    /// A lease on the key ended without a value (waiters may take over).
    LeaseEnded {
        /// The key.
        key: String,
    },
    /// Tags were invalidated: each with its new generation.
    Tags(Vec<(String, u64)>),
    /// The whole namespace was invalidated: its new generation.
    Namespace {
        /// The namespace's new generation.
        generation: u64,
    },
}

impl Change {
    /// The key this change is about, if it is about one key.
    #[must_use]
    pub fn key(&self) -> Option<&str> {
        match &self.what {
            What::Written { key, .. } | What::Deleted { key } | What::LeaseEnded { key } => {
                Some(key)
            }
            What::Tags(_) | What::Namespace { .. } => None,
        }
    }

    /// The message form (what the Redis scripts publish).
    #[must_use]
    pub fn encode(&self) -> String {
        let (kind, number, rest) = match &self.what {
            What::Written { key, version } => ('k', *version, key.clone()),
            What::Deleted { key } => ('d', 0, key.clone()),
            What::LeaseEnded { key } => ('a', 0, key.clone()),
            What::Tags(tags) => (
                't',
                0,
                tags.iter()
                    .map(|(t, g)| format!("{g} {t}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            What::Namespace { generation } => ('n', *generation, String::new()),
        };
        format!(
            "{} {kind} {} {number} {}{rest}",
            self.seq,
            self.sent_ms,
            tail(&self.namespace, "")
        )
    }

    /// A change from its message form; `None` when it is not one.
    #[must_use]
    pub fn decode(raw: &[u8]) -> Option<Self> {
        let raw = std::str::from_utf8(raw).ok()?;
        let mut parts = raw.splitn(5, ' ');
        let seq = parts.next()?.parse().ok()?;
        let kind = parts.next()?;
        let sent_ms = parts.next()?.parse().ok()?;
        let number: u64 = parts.next()?.parse().ok()?;
        let rest = parts.next()?;
        let (len, rest) = rest.split_once(':')?;
        let len: usize = len.parse().ok()?;
        let namespace = rest.get(..len)?.to_owned();
        let rest = rest.get(len..)?;
        let what = match kind {
            "k" => What::Written {
                key: rest.to_owned(),
                version: number,
            },
            "d" => What::Deleted {
                key: rest.to_owned(),
            },
            "a" => What::LeaseEnded {
                key: rest.to_owned(),
            },
            "t" => What::Tags(
                rest.split('\n')
                    .map(|line| {
                        let (g, t) = line.split_once(' ')?;
                        Some((t.to_owned(), g.parse().ok()?))
                    })
                    .collect::<Option<_>>()?,
            ),
            "n" => What::Namespace { generation: number },
            _ => return None,
        };
        Some(Self {
            seq,
            sent_ms,
            namespace,
            what,
        })
    }
}

/// The namespace (length-prefixed) followed by `rest`: the end of a message.
#[must_use]
pub fn tail(namespace: &str, rest: &str) -> String {
    format!("{}:{namespace}{rest}", namespace.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_kind_round_trips_through_the_message_form() {
        for what in [
            What::Written {
                key: "a key with spaces:and|bars".into(),
                version: 7,
            },
            What::Deleted { key: "k".into() },
            What::LeaseEnded { key: "k".into() },
            What::Tags(vec![("user:1".into(), 3), ("doc".into(), 1)]),
            What::Namespace { generation: 9 },
        ] {
            let change = Change {
                seq: 42,
                sent_ms: 1_700_000_000_000,
                namespace: "ns:1|x".into(),
                what,
            };
            assert_eq!(
                Change::decode(change.encode().as_bytes()),
                Some(change.clone())
            );
        }
        assert_eq!(Change::decode(b"nonsense"), None);
        assert_eq!(Change::decode(b"1 k 2 3 99:short"), None);
    }
}
