//! The cluster side of the bus: forwards to other instances (planned per event from the
//! cluster view), forwards received, the interests this instance advertises, and the
//! backplane shed advisories.

use super::*;

impl Bus {
    pub(super) fn send_forwards(&self, forwards: Forwards, event: &Event) -> usize {
        let Some(cluster) = &self.inner.cluster else {
            return 0;
        };
        let counters = &self.inner.counters;
        let mut sent = 0;
        for (to, (plain, groups)) in forwards {
            let forward = Forward {
                from: self.inner.config.instance_id.clone(),
                event: event.clone(),
                plain,
                groups,
            };
            let (queued, shed) = match cluster.backplane.send(&to, forward) {
                Handed::Queued => (true, None),
                Handed::QueuedShedding(lower) => (true, Some(lower)),
                Handed::Dropped => (false, Some(event.priority)),
            };
            if queued {
                counters.forwarded_out.inc();
                sent += 1;
            }
            if let Some(priority) = shed {
                counters.forward_dropped.inc();
                counters.forward_shed[priority.index()].inc();
            }
        }
        sent
    }

    /// Tells `sys.advisory.eventbus.shed` when the backplane shed forwards since the last
    /// call (housekeeping calls it once a second): one advisory per side that did, with how
    /// many of each priority — `sending` (the queue to the other instances was full) or
    /// `receiving` (this bus fell behind the forwards sent to it).
    pub(super) fn backplane_shed_advisories(&self, now: u64) {
        let sending = self
            .inner
            .counters
            .forward_shed
            .each_ref()
            .map(IntCounter::get);
        let sides = [
            ("sending", sending),
            ("receiving", self.forwards_shed_on_arrival()),
        ];
        for (side, (name, totals)) in sides.into_iter().enumerate() {
            let shed: [u64; 4] = {
                let mut reported = self.inner.backplane_reported.lock();
                let before = std::mem::replace(&mut reported[side], totals);
                std::array::from_fn(|i| totals[i].saturating_sub(before[i]))
            };
            if shed == [0; 4] {
                continue;
            }
            let data = format!(
                "{{\"backplane\":\"{name}\",\"shed\":{{\"low\":{},\"normal\":{},\"high\":{},\"critical\":{}}}}}",
                shed[0], shed[1], shed[2], shed[3]
            );
            self.route(&Arc::new(self.advisory(now, data)), now);
        }
    }

    /// Delivers an event another instance routed here, to the subscriptions it was meant for.
    pub fn accept_forward(&self, forward: Forward) {
        let inner = &self.inner;
        inner.counters.forwarded_in.inc();
        let event = Arc::new(forward.event);
        if self.answer_inbox(&event) {
            return;
        }
        let broadcast = event.subject.starts_with(BROADCAST_PREFIX);
        let mut groups = self.local_groups(&event.subject);
        if !broadcast {
            groups.retain(|g| match cluster_group(g) {
                None => forward.plain,
                Some(id) => forward.groups.iter().any(|f| f == id),
            });
        }
        if groups.is_empty() {
            inner.counters.no_interest.inc();
            return;
        }
        self.offer_to(&groups, &event, now_ms());
    }

    /// This instance's interests, as advertised to the others.
    pub(super) fn interests(&self) -> Vec<Interest> {
        let inner = &self.inner;
        let groups: Vec<Arc<Consumer>> = inner.groups.read().values().cloned().collect();
        let mut plain: HashSet<String> = HashSet::new();
        let mut out = Vec::new();
        for g in groups {
            let members = g.member_count();
            if members == 0 || g.is_closed() {
                continue;
            }
            match cluster_group(&g) {
                Some(id) => out.push(Interest {
                    filter: g.options.filter.as_str().to_owned(),
                    group: Some(id.to_owned()),
                    members: u32::try_from(members).unwrap_or(u32::MAX),
                }),
                None => {
                    plain.insert(g.options.filter.as_str().to_owned());
                }
            }
        }
        plain.insert(format!("{INBOX_PREFIX}{}.>", inner.inbox_token));
        out.extend(plain.into_iter().map(|filter| Interest {
            filter,
            group: None,
            members: 1,
        }));
        out.sort_by(|a, b| (&a.filter, &a.group).cmp(&(&b.filter, &b.group)));
        out
    }

    /// Tells the advertiser this instance's interests changed.
    pub(super) fn interests_changed(&self) {
        if let Some(cluster) = &self.inner.cluster {
            cluster.changed.notify_one();
        }
    }

    /// Whether a subscription anywhere in the cluster matches `subject`.
    pub(super) fn anyone_interested(&self, subject: &str) -> bool {
        self.inner.index.read().has_match(subject)
            || self
                .inner
                .cluster
                .as_ref()
                .is_some_and(|c| c.view.read().has_match(subject))
    }
}

/// Instance → (whether its plain subscriptions get the event, the groups chosen there).
pub(super) type Forwards = HashMap<String, (bool, Vec<String>)>;

/// The cluster-wide identity of a named group (`q:<group>|<filter>`); `None` without a name.
pub(super) fn cluster_group(group: &Consumer) -> Option<&str> {
    (group.options.queue_group.is_some() || group.options.durable_name.is_some())
        .then_some(group.log_group.as_str())
}

/// Which instances get `event` (instance → (plain subscriptions, chosen groups)), and the
/// local named groups that another instance was chosen for.
pub(super) fn plan_forwards<'a>(
    view: &'a ClusterView,
    local: &'a [Arc<Consumer>],
    event: &Event,
) -> (Forwards, HashSet<String>) {
    let broadcast = event.subject.starts_with(BROADCAST_PREFIX);
    let mut forwards: Forwards = HashMap::new();
    // Candidates per named group: `None` is this instance.
    let mut named: HashMap<&'a str, Vec<(Option<&'a str>, u32)>> = HashMap::new();
    view.for_each_match(&event.subject, |instance, interest| {
        match (&interest.group, broadcast) {
            (None, _) | (Some(_), true) => {
                forwards.entry(instance.to_owned()).or_default().0 = true;
            }
            (Some(group), false) => named
                .entry(group.as_str())
                .or_default()
                .push((Some(instance), interest.members)),
        }
    });
    let mut skip = HashSet::new();
    if broadcast {
        return (forwards, skip);
    }
    for g in local {
        if let Some(id) = cluster_group(g) {
            named
                .entry(id)
                .or_default()
                .push((None, u32::try_from(g.member_count()).unwrap_or(u32::MAX)));
        }
    }
    let hash = xxhash_rust::xxh3::xxh3_64(event.id.as_bytes());
    for (group, candidates) in named {
        if candidates.iter().all(|(who, _)| who.is_none()) {
            continue;
        }
        let group_hash = hash ^ xxhash_rust::xxh3::xxh3_64(group.as_bytes());
        if let Some(Some(instance)) = pick_weighted(&candidates, group_hash) {
            forwards
                .entry(instance.to_owned())
                .or_default()
                .1
                .push(group.to_owned());
            skip.insert(group.to_owned());
        }
    }
    forwards.retain(|_, (plain, groups)| *plain || !groups.is_empty());
    (forwards, skip)
}

/// Applies what the backplane hands over, while the bus lives.
pub(super) async fn cluster_inbound(inner: Weak<Inner>, mut inbound: mpsc::Receiver<Inbound>) {
    while let Some(message) = inbound.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let bus = Bus { inner };
        match message {
            Inbound::Forward(forward) => bus.accept_forward(*forward),
            Inbound::Interests {
                instance,
                interests,
            } => {
                let Some(cluster) = &bus.inner.cluster else {
                    return;
                };
                if instance == bus.inner.config.instance_id {
                    continue;
                }
                let view = {
                    let mut remotes = cluster.remotes.lock();
                    let unchanged = match remotes.get(&instance) {
                        Some(known) => *known == interests,
                        None => interests.is_empty(),
                    };
                    if unchanged {
                        continue;
                    }
                    if interests.is_empty() {
                        remotes.remove(&instance);
                    } else {
                        remotes.insert(instance, interests);
                    }
                    ClusterView::new(&remotes)
                };
                *cluster.view.write() = Arc::new(view);
            }
        }
    }
}

/// Advertises this instance's interests when they change (and at start), while the bus lives.
pub(super) async fn cluster_advertise(inner: Weak<Inner>, changed: Arc<Notify>) {
    let mut last: Option<Vec<Interest>> = None;
    loop {
        {
            let Some(inner) = inner.upgrade() else { return };
            let bus = Bus { inner };
            let interests = bus.interests();
            if last.as_ref() != Some(&interests) {
                if let Some(cluster) = &bus.inner.cluster {
                    cluster.backplane.advertise(interests.clone());
                }
                last = Some(interests);
            }
        }
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
