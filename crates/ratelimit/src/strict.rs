//! STRICT consistency: GCRA decided atomically inside Redis, so any number of limiter instances
//! sharing one Redis never admit more than the limit between them.
//!
//! The semantics are those of the local GCRA in [`crate::algorithm`] (`limit` units per
//! `period`, at most `burst` at once, continuous refill, a cost of 0 peeks, a cost above the
//! burst can never pass), with two differences: time is Redis's own clock (`TIME`, shared by
//! every instance) in whole microseconds, and durations in a decision are rounded *up* to the
//! microsecond.
//!
//! # Arithmetic
//!
//! Lua numbers are doubles, exact only below 2^53, so the script never multiplies or divides.
//! With `g = gcd(period_us, limit)`, one unit's emission interval is `per_unit / scale`
//! microseconds where `scale = limit / g` and `per_unit = period_us / g`: a time kept as whole
//! microseconds plus a fraction in `1/scale` µs (`0 <= f < scale`) is exact for any limit, even
//! 3 per second. This side computes the burst tolerance `tau = burst × per_unit`, what must
//! fit (`max(cost, 1) × per_unit`) and what is debited (`cost × per_unit`) in `u128` and splits
//! them into that two-part form; the script only adds, subtracts and compares, and reports
//! spans that this side turns back into whole units. Two-part times saturate at
//! [`MAX_SPAN_MICROS`] (about 71 years), which only specs with a burst tolerance that long ever
//! reach, and then only ever deny more, never admit more.
//!
//! # Keys and state
//!
//! One key per limited key, `<prefix>:{<key_hash as 16 lowercase hex>}`: the braces are a Redis
//! Cluster hash tag, so each key is one slot, and only the hash (of namespace, key and limit
//! identity, computed by the caller) ever reaches Redis. The value is the theoretical arrival
//! time, set with `PX` until the bucket is full again, so idle keys vanish by themselves.
//!
//! # Failure
//!
//! Every call runs under the caller's budget (`tokio::time::timeout`) and a
//! [`CircuitBreaker`]: Redis refusing connections, I/O errors and budgets running out open it,
//! after which calls fail at once with [`StrictError::Unavailable`] until half-open probes
//! succeed. The [`ConnectionManager`] reconnects by itself in the background.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentmesh_runtime::breaker::{BreakerConfig, BreakerPhase, CircuitBreaker, Permit};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, ErrorKind, RedisError, RedisResult, Script, ServerErrorKind};
use tracing::{debug, info, warn};

use crate::spec::{MAX_ITEMS, MAX_LIMIT, MAX_PERIOD, MIN_PERIOD};

/// The decision script; see the comments at its top.
const GCRA_SCRIPT: &str = include_str!("strict_gcra.lua");

/// Integers the script returns per item.
const REPLY_WIDTH: usize = 8;

/// Longest two-part time handed to the script, in microseconds (2^51 µs ≈ 71 years): with
/// Redis's clock (now ≈ 2^51 µs since 1970 until the 2040s) every sum the script forms stays
/// below 2^53.
pub const MAX_SPAN_MICROS: u64 = 1 << 51;

/// One Redis failure is logged at `warn` per this interval; the rest at `debug`.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Longest pause between reconnection attempts, so a returning Redis is found quickly.
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);

/// How often Redis is checked while the breaker is open or half-open.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// One item to decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StrictItem {
    /// Hash of namespace, key and limit identity; names the Redis key.
    pub key_hash: u64,
    /// Units per period, clamped into `1..=MAX_LIMIT`.
    pub limit: u64,
    /// Refill period, clamped into `MIN_PERIOD..=MAX_PERIOD` and rounded up to the microsecond.
    pub period: Duration,
    /// Most units at once; 0 = `limit`; at most `MAX_LIMIT`.
    pub burst: u64,
    /// Units to spend; 0 peeks (spends nothing, passes iff one unit is available).
    pub cost: u64,
    /// SHADOW mode: over its limit it is reported but does not fail an all-or-nothing batch.
    pub shadow: bool,
}

/// The outcome of one item.
///
/// With `all_or_nothing`, when any item does not fit nothing is debited and every item reads
/// `allowed: false`; the items that did fit (batch-rejected) are the ones with `retry_after ==
/// Some(Duration::ZERO)`, and keep the `remaining` they would have left, as in the local limiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrictDecision {
    /// The cost was debited (for a peek: one unit is available).
    pub allowed: bool,
    /// Whole units available after this decision.
    pub remaining: u64,
    /// `Some(ZERO)` if allowed, `Some(d)` until the same cost fits, `None` if it never can.
    pub retry_after: Option<Duration>,
    /// Until the bucket is full again.
    pub reset_after: Duration,
}

/// Why a strict decision could not be made.
#[derive(Debug, thiserror::Error)]
pub enum StrictError {
    /// Redis refused the connection, an I/O error, Redis is loading or read-only, or the
    /// circuit breaker is open.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// The budget ran out before Redis answered.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error or an unexpected reply (on Redis Cluster, `CROSSSLOT` for an
    /// `all_or_nothing` batch whose keys are in several slots).
    #[error("redis strict script: {0}")]
    Script(String),
    /// More items than one call may carry (a caller's mistake).
    #[error("at most {max} items per strict check, got {count}")]
    TooManyItems {
        /// Items given.
        count: usize,
        /// The bound, `MAX_ITEMS`.
        max: usize,
    },
}

impl StrictError {
    /// Whether this error says Redis is unwell (and counts against the circuit breaker).
    fn is_redis_failure(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Timeout(_))
    }
}

/// Settings of the Redis-strict store.
#[derive(Clone)]
pub struct StrictConfig {
    /// `redis://host:port[/db]`, `rediss://…` or `unix://…`.
    pub url: String,
    /// Prefix of every key. Default `agentmesh:rl`.
    pub key_prefix: String,
    /// Bound on connecting (and on each reconnection attempt). Default 2 s.
    pub connect_timeout: Duration,
    /// The circuit breaker in front of Redis.
    pub breaker: BreakerConfig,
}

impl StrictConfig {
    /// Defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key_prefix: "agentmesh:rl".to_owned(),
            connect_timeout: Duration::from_secs(2),
            breaker: BreakerConfig::default(),
        }
    }
}

impl fmt::Debug for StrictConfig {
    // The URL may carry a password: only its host part is shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StrictConfig")
            .field("url", &redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("breaker", &self.breaker)
            .finish()
    }
}

/// The Redis-strict decision store; cheap to clone (one shared connection and breaker).
#[derive(Clone)]
pub struct RedisStrict {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    script: Script,
    key_prefix: String,
    breaker: CircuitBreaker,
    warn_limiter: WarnLimiter,
}

impl fmt::Debug for RedisStrict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStrict")
            .field("key_prefix", &self.inner.key_prefix)
            .field("breaker", &self.inner.breaker.phase(Instant::now()))
            .finish_non_exhaustive()
    }
}

impl RedisStrict {
    /// Connects (a [`ConnectionManager`], which reconnects by itself) and loads the script
    /// once (`SCRIPT LOAD`), within `connect_timeout`. `breaker_gauge` tracks the breaker's
    /// phase (0 closed, 1 open, 2 half-open).
    ///
    /// # Errors
    /// `Unavailable` when the URL is invalid or Redis cannot be reached, `Timeout` when
    /// connecting takes longer than `connect_timeout`, `Script` when loading fails.
    pub async fn connect(
        config: StrictConfig,
        breaker_gauge: Option<prometheus::IntGauge>,
    ) -> Result<Self, StrictError> {
        let client = redis::Client::open(config.url.as_str()).map_err(|e| {
            StrictError::Unavailable(format!(
                "invalid redis url {}: {e}",
                redact_url(&config.url)
            ))
        })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.connect_timeout))
            .set_max_delay(RECONNECT_MAX_DELAY)
            // Keep reconnecting for as long as Redis is away: with the default 6 attempts a
            // reconnect gave up after 2-4 s, and the next call (a half-open probe) was answered
            // with that stale error, doubling the breaker's open time. Calls stay bounded by
            // their budget, and the open breaker answers them without waiting.
            .set_number_of_retries(usize::MAX);
        let script = Script::new(GCRA_SCRIPT);
        let connect = async {
            let mut conn = ConnectionManager::new_with_config(client, manager_config)
                .await
                .map_err(|e| classify(&e))?;
            load_script(&script, &mut conn).await?;
            Ok::<_, StrictError>(conn)
        };
        let conn = tokio::time::timeout(config.connect_timeout, connect)
            .await
            .map_err(|_| StrictError::Timeout(config.connect_timeout))??;
        debug!(url = %redact_url(&config.url), "redis strict store connected");
        let inner = Arc::new(Inner {
            conn,
            script,
            key_prefix: config.key_prefix,
            breaker: CircuitBreaker::new(config.breaker, breaker_gauge),
            warn_limiter: WarnLimiter::new(),
        });
        tokio::spawn(health_checks(
            Arc::downgrade(&inner),
            config.connect_timeout,
        ));
        Ok(Self { inner })
    }

    /// Decides `items`.
    ///
    /// Without `all_or_nothing`: one `EVALSHA` per item, all pipelined in one round trip, each
    /// item atomic on its own. With `all_or_nothing`: one script call over all keys that debits
    /// every item or none (on Redis Cluster this needs every key in one slot, else the call
    /// fails with `CROSSSLOT`: give the items one hash tag). Either way an item repeated in the
    /// batch sees its own earlier debit.
    ///
    /// # Errors
    /// `Timeout` when `budget` runs out first, `Unavailable` when Redis cannot be reached or
    /// the circuit breaker is open (at once), `Script` for an unexpected reply, `TooManyItems`
    /// beyond `MAX_ITEMS`.
    pub async fn check(
        &self,
        items: &[StrictItem],
        all_or_nothing: bool,
        budget: Duration,
    ) -> Result<Vec<StrictDecision>, StrictError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        if items.len() > MAX_ITEMS {
            return Err(StrictError::TooManyItems {
                count: items.len(),
                max: MAX_ITEMS,
            });
        }
        let prepared: Vec<Prepared> = items.iter().map(Prepared::new).collect();
        // A single item is trivially all-or-nothing.
        let replies = if all_or_nothing && items.len() > 1 {
            let call = self.eval_together(items, &prepared);
            self.guarded("check", budget, call).await?
        } else {
            let call = self.eval_each(items, &prepared);
            self.guarded("check", budget, call).await?
        };
        let mut decisions = prepared
            .iter()
            .zip(replies.chunks(REPLY_WIDTH))
            .map(|(p, reply)| p.decision(reply))
            .collect::<Result<Vec<_>, _>>()?;
        if all_or_nothing
            && decisions
                .iter()
                .zip(items)
                .any(|(d, i)| !d.allowed && !i.shadow)
        {
            for d in decisions.iter_mut().filter(|d| d.allowed) {
                d.allowed = false;
            }
        }
        Ok(decisions)
    }

    /// Deletes the state of one key (its bucket is full again).
    ///
    /// # Errors
    /// As [`check`](Self::check).
    pub async fn reset(&self, key_hash: u64, budget: Duration) -> Result<(), StrictError> {
        let mut conn = self.inner.conn.clone();
        let key = self.key(key_hash);
        let call = async move {
            redis::cmd("DEL")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await
                .map(drop)
                .map_err(|e| classify(&e))
        };
        self.guarded("reset", budget, call).await
    }

    /// The Redis key of `key_hash`.
    fn key(&self, key_hash: u64) -> String {
        format!("{}:{{{key_hash:016x}}}", self.inner.key_prefix)
    }

    /// One `EVALSHA` per item, pipelined; items that met `NOSCRIPT` are retried once after
    /// reloading the script (the others ran and must not run twice).
    async fn eval_each(
        &self,
        items: &[StrictItem],
        prepared: &[Prepared],
    ) -> Result<Vec<i64>, StrictError> {
        let mut conn = self.inner.conn.clone();
        let cmds: Vec<Cmd> = items
            .iter()
            .zip(prepared)
            .map(|(item, p)| {
                self.evalsha(std::slice::from_ref(item), std::slice::from_ref(p), false)
            })
            .collect();
        let mut replies: Vec<Option<Vec<i64>>> = vec![None; cmds.len()];
        let mut missing = Vec::new();
        let first = query_pipeline(&mut conn, cmds.iter()).await?;
        for (i, reply) in first.into_iter().enumerate() {
            match reply {
                Ok(values) => replies[i] = Some(values),
                Err(e) if is_noscript(&e) => missing.push(i),
                Err(e) => return Err(classify(&e)),
            }
        }
        if !missing.is_empty() {
            debug!(
                items = missing.len(),
                "redis strict script missing; reloading"
            );
            load_script(&self.inner.script, &mut conn).await?;
            let retried = query_pipeline(&mut conn, missing.iter().map(|&i| &cmds[i])).await?;
            for (&i, reply) in missing.iter().zip(retried) {
                replies[i] = Some(reply.map_err(|e| classify(&e))?);
            }
        }
        let mut flat = Vec::with_capacity(items.len() * REPLY_WIDTH);
        for reply in replies {
            let values = reply.ok_or_else(|| script_error("pipeline reply too short"))?;
            if values.len() != REPLY_WIDTH {
                return Err(script_error(format!(
                    "expected {REPLY_WIDTH} integers per item, got {}",
                    values.len()
                )));
            }
            flat.extend(values);
        }
        Ok(flat)
    }

    /// One `EVALSHA` over every key, retried once after reloading on `NOSCRIPT` (which ran
    /// nothing).
    async fn eval_together(
        &self,
        items: &[StrictItem],
        prepared: &[Prepared],
    ) -> Result<Vec<i64>, StrictError> {
        let mut conn = self.inner.conn.clone();
        let cmd = self.evalsha(items, prepared, true);
        let reply = match cmd.query_async::<Vec<i64>>(&mut conn).await {
            Err(e) if is_noscript(&e) => {
                debug!("redis strict script missing; reloading");
                load_script(&self.inner.script, &mut conn).await?;
                cmd.query_async::<Vec<i64>>(&mut conn).await
            }
            other => other,
        }
        .map_err(|e| classify(&e))?;
        if reply.len() != items.len() * REPLY_WIDTH {
            return Err(script_error(format!(
                "expected {} integers, got {}",
                items.len() * REPLY_WIDTH,
                reply.len()
            )));
        }
        Ok(reply)
    }

    /// `EVALSHA sha n key… all_or_nothing args…` for `items` decided in one call.
    fn evalsha(&self, items: &[StrictItem], prepared: &[Prepared], all_or_nothing: bool) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.inner.script.get_hash()).arg(items.len());
        for item in items {
            cmd.arg(self.key(item.key_hash));
        }
        cmd.arg(if all_or_nothing { "1" } else { "0" });
        for p in prepared {
            cmd.arg(&p.args[..]);
        }
        cmd
    }

    /// Runs `call` under `budget` and the circuit breaker, and logs its failure.
    async fn guarded<T>(
        &self,
        op: &'static str,
        budget: Duration,
        call: impl Future<Output = Result<T, StrictError>>,
    ) -> Result<T, StrictError> {
        if budget.is_zero() {
            return Err(StrictError::Timeout(budget));
        }
        let breaker = &self.inner.breaker;
        let attempt = match breaker.try_acquire(Instant::now()) {
            Ok(permit) => Attempt {
                breaker,
                permit: Some(permit),
            },
            Err(retry_in) => {
                return Err(StrictError::Unavailable(format!(
                    "circuit open, retry in {}ms",
                    retry_in.as_millis()
                )));
            }
        };
        let result = tokio::time::timeout(budget, call)
            .await
            .unwrap_or(Err(StrictError::Timeout(budget)));
        attempt.finish(!result.as_ref().is_err_and(StrictError::is_redis_failure));
        if let Err(e) = &result {
            if self.inner.warn_limiter.allow() {
                warn!(op, error = %e, "redis strict call failed");
            } else {
                debug!(op, error = %e, "redis strict call failed");
            }
        }
        result
    }
}

/// One item turned into the script's exact integers.
struct Prepared {
    /// `limit / gcd(period_us, limit)`: fractions are in `1/scale` µs.
    scale: u64,
    /// One unit's emission interval in `1/scale` µs.
    per_unit: u64,
    /// Effective burst.
    burst: u64,
    /// scale, tau (us, f), need (us, f), debit (us, f), flags (1 never, 2 shadow).
    args: [u64; 8],
}

impl Prepared {
    fn new(item: &StrictItem) -> Self {
        let limit = item.limit.clamp(1, MAX_LIMIT);
        let burst = if item.burst == 0 {
            limit
        } else {
            item.burst.min(MAX_LIMIT)
        };
        // Rounded up: a longer period refills slower, never faster.
        let period_us = u64::try_from(
            item.period
                .clamp(MIN_PERIOD, MAX_PERIOD)
                .as_nanos()
                .div_ceil(1000),
        )
        .unwrap_or(u64::MAX);
        let g = gcd(period_us, limit);
        let (scale, per_unit) = (limit / g, period_us / g);
        // Two-part form of `units × per_unit` (in 1/scale µs), saturating; with units, burst
        // <= 1e15 and per_unit < 2^45 the product fits a u128 with room to spare.
        let split = |units: u64| -> (u64, u64) {
            let ticks = u128::from(units) * u128::from(per_unit);
            let scale = u128::from(scale);
            match u64::try_from(ticks / scale) {
                Ok(us) if us < MAX_SPAN_MICROS => {
                    (us, u64::try_from(ticks % scale).unwrap_or(u64::MAX))
                }
                _ => (MAX_SPAN_MICROS, 0),
            }
        };
        let tau = split(burst);
        let needed = item.cost.max(1);
        let never = needed > burst;
        let need = if never { (0, 0) } else { split(needed) };
        let debit = if item.cost == 0 { (0, 0) } else { need };
        Self {
            scale,
            per_unit,
            burst,
            args: [
                scale,
                tau.0,
                tau.1,
                need.0,
                need.1,
                debit.0,
                debit.1,
                u64::from(never) | (u64::from(item.shadow) << 1),
            ],
        }
    }

    /// Reads the script's 8 integers for this item.
    fn decision(&self, reply: &[i64]) -> Result<StrictDecision, StrictError> {
        let values: Vec<u64> = reply
            .iter()
            .map(|&v| u64::try_from(v))
            .collect::<Result<_, _>>()
            .map_err(|_| script_error(format!("negative value in reply {reply:?}")))?;
        let &[allowed, never, span, span_f, reset, reset_f, retry, retry_f] = values.as_slice()
        else {
            return Err(script_error(format!("malformed reply {reply:?}")));
        };
        if allowed > 1
            || never > 1
            || span_f >= self.scale
            || reset_f >= self.scale
            || retry_f >= self.scale
        {
            return Err(script_error(format!("malformed reply {reply:?}")));
        }
        let ticks = u128::from(span) * u128::from(self.scale) + u128::from(span_f);
        let remaining = u64::try_from(ticks / u128::from(self.per_unit))
            .unwrap_or(u64::MAX)
            .min(self.burst);
        let retry_after = if allowed == 1 {
            Some(Duration::ZERO)
        } else if never == 1 {
            None
        } else {
            Some(ceil_micros(retry, retry_f).max(Duration::from_micros(1)))
        };
        Ok(StrictDecision {
            allowed: allowed == 1,
            remaining,
            retry_after,
            reset_after: ceil_micros(reset, reset_f),
        })
    }
}

/// A two-part time rounded up to the microsecond.
fn ceil_micros(us: u64, fraction: u64) -> Duration {
    Duration::from_micros(us.saturating_add(u64::from(fraction > 0)))
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

/// A breaker permit that counts as a failure if the call is abandoned (its future dropped),
/// so an abandoned half-open probe cannot hold its slot forever.
struct Attempt<'a> {
    breaker: &'a CircuitBreaker,
    permit: Option<Permit>,
}

impl Attempt<'_> {
    fn finish(mut self, success: bool) {
        if let Some(permit) = self.permit.take() {
            self.breaker.record(permit, success, Instant::now());
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.breaker.record(permit, false, Instant::now());
        }
    }
}

/// Lets one warning through per [`WARN_EVERY`].
struct WarnLimiter {
    origin: Instant,
    next_ms: AtomicU64,
}

impl WarnLimiter {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            next_ms: AtomicU64::new(0),
        }
    }

    fn allow(&self) -> bool {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        let every = u64::try_from(WARN_EVERY.as_millis()).unwrap_or(u64::MAX);
        now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(every),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

/// While the breaker is not closed, checks Redis every [`HEALTH_CHECK_INTERVAL`] out of band —
/// `PING`, then `SCRIPT LOAD` (an empty, restarted Redis has no script) — with the connect
/// timeout rather than a check's few-millisecond budget, and closes the breaker as soon as one
/// passes. So every instance is back within about one interval after Redis returns, instead of
/// waiting out an open period that doubled each time a cold probe (new connection, NOSCRIPT,
/// script load) missed its budget. Ends when the store is dropped.
async fn health_checks(inner: std::sync::Weak<Inner>, timeout: Duration) {
    loop {
        tokio::time::sleep(HEALTH_CHECK_INTERVAL).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.breaker.phase(Instant::now()) == BreakerPhase::Closed {
            continue;
        }
        let mut conn = inner.conn.clone();
        let check = async {
            redis::cmd("PING")
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| classify(&e))?;
            load_script(&inner.script, &mut conn).await
        };
        match tokio::time::timeout(timeout, check).await {
            Ok(Ok(())) => {
                inner.breaker.close_after_health_check();
                info!("redis answers again: strict checks resume");
            }
            Ok(Err(e)) => debug!(error = %e, "redis health check failed"),
            Err(_) => debug!("redis health check timed out"),
        }
    }
}

async fn load_script(script: &Script, conn: &mut ConnectionManager) -> Result<(), StrictError> {
    let sha = script.load_async(conn).await.map_err(|e| classify(&e))?;
    if sha == script.get_hash() {
        Ok(())
    } else {
        Err(script_error(format!(
            "SCRIPT LOAD answered sha {sha}, expected {}",
            script.get_hash()
        )))
    }
}

/// Sends `cmds` as one pipeline; each reply is its own result, so one `NOSCRIPT` can be told
/// apart from the items that ran.
async fn query_pipeline<'a>(
    conn: &mut ConnectionManager,
    cmds: impl Iterator<Item = &'a Cmd>,
) -> Result<Vec<RedisResult<Vec<i64>>>, StrictError> {
    let mut pipe = redis::pipe();
    for cmd in cmds {
        pipe.add_command(cmd.clone());
    }
    let expected = pipe.len();
    let replies: Vec<RedisResult<Vec<i64>>> = pipe
        .ignore_errors()
        .query_async(conn)
        .await
        .map_err(|e| classify(&e))?;
    if replies.len() == expected {
        Ok(replies)
    } else {
        Err(script_error(format!(
            "pipeline of {expected} answered {} replies",
            replies.len()
        )))
    }
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// Redis unwell (unreachable, loading, read-only, busy, out of memory) is `Unavailable`;
/// anything else (an error from the script, a reply of the wrong shape) is `Script`.
fn classify(e: &RedisError) -> StrictError {
    let unwell = e.is_io_error()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                )
        )
        || matches!(e.code(), Some("BUSY" | "OOM" | "MISCONF"));
    if unwell {
        StrictError::Unavailable(e.to_string())
    } else {
        StrictError::Script(e.to_string())
    }
}

fn script_error(message: impl Into<String>) -> StrictError {
    StrictError::Script(message.into())
}

/// `url` without its user and password.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(limit: u64, period: Duration, burst: u64, cost: u64) -> StrictItem {
        StrictItem {
            shadow: false,
            key_hash: 1,
            limit,
            period,
            burst,
            cost,
        }
    }

    #[test]
    fn test_prepared_splits_non_integer_emission_intervals_exactly() {
        // 3 per second: 333_333⅓ µs per unit, kept as thirds of a microsecond.
        let p = Prepared::new(&item(3, Duration::from_secs(1), 0, 2));
        assert_eq!((p.scale, p.per_unit), (3, 1_000_000));
        assert_eq!(p.args, [3, 1_000_000, 0, 666_666, 2, 666_666, 2, 0]);
        // 100 per hour: a whole 36 s per unit, no fraction at all.
        let p = Prepared::new(&item(100, Duration::from_secs(3600), 0, 1));
        assert_eq!(p.scale, 1);
        assert_eq!(
            p.args,
            [1, 3_600_000_000, 0, 36_000_000, 0, 36_000_000, 0, 0]
        );
    }

    #[test]
    fn test_prepared_peek_debits_nothing_and_cost_over_burst_never_fits() {
        let p = Prepared::new(&item(10, Duration::from_secs(1), 5, 0));
        assert_eq!(&p.args[3..], &[100_000, 0, 0, 0, 0]);
        let p = Prepared::new(&item(10, Duration::from_secs(1), 5, u64::MAX));
        assert_eq!(&p.args[3..], &[0, 0, 0, 0, 1]);
    }

    #[test]
    fn test_prepared_saturates_spans_beyond_the_cap() {
        // 1 per 366 days with a burst of 1e15: the tolerance is far beyond 71 years.
        let p = Prepared::new(&item(1, MAX_PERIOD, MAX_LIMIT, MAX_LIMIT));
        assert_eq!(
            &p.args[1..7],
            &[MAX_SPAN_MICROS, 0, MAX_SPAN_MICROS, 0, MAX_SPAN_MICROS, 0]
        );
        // Out-of-bounds specs are clamped like the local limiter's.
        let p = Prepared::new(&item(0, Duration::ZERO, 0, 1));
        assert_eq!((p.scale, p.per_unit, p.burst), (1, 1000, 1));
    }

    #[test]
    fn test_decision_reads_units_and_rounds_durations_up() {
        let p = Prepared::new(&item(3, Duration::from_secs(1), 0, 1));
        // Two thirds of a second of room: 2 units; reset 1/3 s rounded up.
        let d = p.decision(&[1, 0, 666_666, 2, 333_333, 1, 0, 0]).unwrap();
        assert_eq!(
            d,
            StrictDecision {
                allowed: true,
                remaining: 2,
                retry_after: Some(Duration::ZERO),
                reset_after: Duration::from_micros(333_334),
            }
        );
        let d = p.decision(&[0, 0, 0, 0, 1_000_000, 0, 333_333, 1]).unwrap();
        assert_eq!(d.retry_after, Some(Duration::from_micros(333_334)));
        assert_eq!(
            p.decision(&[0, 1, 0, 0, 0, 0, 0, 0]).unwrap().retry_after,
            None
        );
        assert!(
            p.decision(&[0, 0, 0, 3, 0, 0, 0, 0]).is_err(),
            "fraction >= scale"
        );
        assert!(p.decision(&[0, 0, 0]).is_err());
        assert!(p.decision(&[-1, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn test_redact_url_hides_credentials() {
        assert_eq!(redact_url("redis://:secret@h:6379/0"), "redis://…@h:6379/0");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
