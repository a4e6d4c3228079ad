//! The open connections of one listener (proxy or control API), bounded in total and per
//! client address. A connection is in one [`Phase`]: *waiting* for a complete request
//! header (a fresh connection, or a kept-alive one between requests), *reading a body*
//! (the control API reads a request's whole body before any handler runs), or *busy*
//! while a request is being served.
//!
//! At a bound, a new connection takes the place of the oldest one that is waiting or
//! reading a body (of the same client when the per-client bound is what was reached),
//! which is told to close. So a flood of connections that trickle their headers or
//! bodies can never lock a well-behaved client out: the client's connection is the
//! newest, sends its request at once and becomes busy, while the flood's oldest
//! connections are closed to make room. Busy connections are never cut; when every
//! connection at the bound is busy, the new one is refused, or, admitted with
//! [`ConnTable::admit_within`] (the control API), waits a bounded time for the next one
//! that finishes a request or closes: a flood of quick valid requests that keeps every
//! place busy delays a newcomer by about one request. Waiters take the places that free
//! up in turn: one makes room only from connections admitted before it began to wait.
//!
//! The phase is one atomic per connection, and eviction takes it to a final `EVICTED`
//! by compare-and-swap: a connection that turns busy at the instant it is chosen either
//! becomes busy first (and is not chosen) or learns from [`ConnGuard::enter`] that it was
//! evicted (and serves nothing). A handler never starts on an evicted connection.
//!
//! An HTTP/2 connection serves its requests as concurrent streams: it is busy while at
//! least one stream is being served and waiting between them ([`StreamCount`]), so
//! connections kept open by a trickle of cheap requests make room like idle ones.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Open connections at most.
    pub max_total: usize,
    /// Open connections of one client address at most (0: no per-client bound).
    pub max_per_client: usize,
}

pub struct ConnTable {
    limits: ConnLimits,
    inner: Mutex<Inner>,
    counts: Counts,
    /// Told when a place may have come free (a connection finished a request or closed),
    /// if anyone is waiting for one.
    room: Notify,
    /// Connections waiting in `admit_within`, in all and (in `Inner`) per client.
    waiting: AtomicUsize,
}

/// Connections that may wait for a place at once: more are refused at once.
const MAX_WAITING: usize = 256;
/// Connections of one client address that may wait for a place at once.
const MAX_WAITING_PER_CLIENT: usize = 8;
/// Places taken by waiters through eviction: at most one per this many ms (500 a second).
const HANDOVER_GAP_MS: i64 = 2;
/// How often a waiting connection looks for a place besides being told of one.
const LOOK_AGAIN: std::time::Duration = std::time::Duration::from_millis(50);

/// `keybrake_connections_{open,refused_total,evicted_total}{listener}` of one table.
struct Counts {
    open: prometheus::IntGauge,
    refused: prometheus::IntCounter,
    evicted: prometheus::IntCounter,
}

impl Counts {
    fn of(listener: &str) -> Counts {
        struct Vecs {
            open: prometheus::IntGaugeVec,
            refused: prometheus::IntCounterVec,
            evicted: prometheus::IntCounterVec,
        }
        static VECS: std::sync::OnceLock<Vecs> = std::sync::OnceLock::new();
        let vecs = VECS.get_or_init(|| {
            // Registered once per process; a second registration (never made) would fail
            // and leave these unexported, not break the listener.
            let open = prometheus::IntGaugeVec::new(
                prometheus::Opts::new("keybrake_connections_open", "Open connections"),
                &["listener"],
            )
            .expect("valid metric");
            let refused = prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "keybrake_connections_refused_total",
                    "Connections closed unserved: a connection bound reached with every connection busy (on the control API, after waiting for one to finish its request)",
                ),
                &["listener"],
            )
            .expect("valid metric");
            let evicted = prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "keybrake_connections_evicted_total",
                    "Connections waiting for a request closed to make room for a newer one",
                ),
                &["listener"],
            )
            .expect("valid metric");
            for m in [
                Box::new(open.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(refused.clone()),
                Box::new(evicted.clone()),
            ] {
                let _ = prometheus::register(m);
            }
            Vecs {
                open,
                refused,
                evicted,
            }
        });
        Counts {
            open: vecs.open.with_label_values(&[listener]),
            refused: vecs.refused.with_label_values(&[listener]),
            evicted: vecs.evicted.with_label_values(&[listener]),
        }
    }
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// By admission order: the first waiting entry is the oldest.
    open: BTreeMap<u64, Entry>,
    per_client: crate::Map<IpAddr, usize>,
    /// Connections of each client waiting in `admit_within`.
    waiting_per_client: crate::Map<IpAddr, usize>,
    /// When a waiter last took a place by eviction (`token::mono_ms`).
    last_handover_ms: i64,
}

struct Entry {
    client: IpAddr,
    /// A `Phase` or `EVICTED`, changed by the connection on every request without
    /// taking the table's lock.
    phase: Arc<AtomicU8>,
    evict: Arc<Notify>,
}

/// What a connection is doing, as far as eviction is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Waiting for a complete request header: evictable.
    Waiting = 0,
    /// Reading a request body, before its handler runs: evictable.
    ReadingBody = 1,
    /// Serving a request (its handler, its response): never evicted.
    Busy = 2,
}

/// The phase of a connection evicted to make room; it never leaves it.
const EVICTED: u8 = 3;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// At the total bound, with every connection busy.
    Full,
    /// At the client's bound, with every connection of the client busy.
    ClientFull,
}

/// One admitted connection; dropping it frees its place.
pub struct ConnGuard {
    table: Arc<ConnTable>,
    id: u64,
    phase: Arc<AtomicU8>,
    evict: Arc<Notify>,
    /// When its last response was handed over (`token::mono_ms`; 0: none yet).
    answered_ms: std::sync::atomic::AtomicI64,
}

impl ConnTable {
    /// The table of the `listener` (`proxy`, `control`: the metrics' label).
    pub fn new(listener: &str, limits: ConnLimits) -> Arc<Self> {
        Arc::new(ConnTable {
            limits,
            inner: Mutex::new(Inner::default()),
            counts: Counts::of(listener),
            room: Notify::new(),
            waiting: AtomicUsize::new(0),
        })
    }

    /// Admits a connection from `client` (waiting), making room by evicting the oldest
    /// evictable connection if a bound is reached.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<ConnGuard, Refused> {
        self.try_admit(canonical(client), None)
            .inspect_err(|_| self.counts.refused.inc())
    }

    /// `admit`, but when every connection at the bound is busy, waits until `deadline`
    /// for one to finish its request (it is then evicted, its response written) or to
    /// close. At most `MAX_WAITING` connections wait, `MAX_WAITING_PER_CLIENT` of one
    /// client; beyond that, refused at once. A waiting connection makes room only from
    /// connections admitted before it began to wait: two waiters never take each other's
    /// place, whichever is admitted first.
    pub async fn admit_within(
        self: &Arc<Self>,
        client: IpAddr,
        deadline: tokio::time::Instant,
    ) -> Result<ConnGuard, Refused> {
        let client = canonical(client);
        let why = match self.try_admit(client, None) {
            Ok(guard) => return Ok(guard),
            Err(why) => why,
        };
        let Some(waiting) = Waiting::join(self, client) else {
            self.counts.refused.inc();
            return Err(why);
        };
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Checked after `enable`: a place freed meanwhile is not missed.
            if let Ok(guard) = self.try_admit(client, Some(waiting.ticket)) {
                return Ok(guard);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                self.counts.refused.inc();
                return Err(why);
            }
            // One waiter is told of each place that frees up; one that cannot use it (a
            // place of another client's bound) leaves it to the others' next look.
            let _ = tokio::time::timeout_at(deadline.min(now + LOOK_AGAIN), notified).await;
        }
    }

    /// Tells a connection waiting for a place that one may have come free.
    fn room_may_be_free(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.room.notify_one();
        }
    }

    /// Admits `client`, evicting to make room if needed: the oldest evictable connection,
    /// among those admitted before `before` (an id) if given.
    fn try_admit(
        self: &Arc<Self>,
        client: IpAddr,
        before: Option<u64>,
    ) -> Result<ConnGuard, Refused> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let per_client = inner.per_client.get(&client).copied().unwrap_or(0);
        let client_full =
            self.limits.max_per_client > 0 && per_client >= self.limits.max_per_client;
        if before.is_some() && (client_full || inner.open.len() >= self.limits.max_total) {
            // A waiter makes room from a connection that just finished a request, which
            // its client (a flood that keeps every place busy) opens again at once: such
            // hand-overs are spaced, so waiting never turns the flood into a storm of
            // new connections that fills the listen queue for everyone.
            let now = crate::token::mono_ms();
            if now - inner.last_handover_ms < HANDOVER_GAP_MS {
                return Err(if client_full {
                    Refused::ClientFull
                } else {
                    Refused::Full
                });
            }
            inner.last_handover_ms = now;
        }
        if client_full {
            if !inner.evict_oldest(Some(client), before) {
                return Err(Refused::ClientFull);
            }
            self.counts.evicted.inc();
        }
        if inner.open.len() >= self.limits.max_total {
            if !inner.evict_oldest(None, before) {
                return Err(Refused::Full);
            }
            self.counts.evicted.inc();
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let evict = Arc::new(Notify::new());
        let phase = Arc::new(AtomicU8::new(Phase::Waiting as u8));
        inner.open.insert(
            id,
            Entry {
                client,
                phase: phase.clone(),
                evict: evict.clone(),
            },
        );
        *inner.per_client.entry(client).or_insert(0) += 1;
        self.counts.open.set(inner.open.len() as i64);
        Ok(ConnGuard {
            table: self.clone(),
            id,
            phase,
            evict,
            answered_ms: Default::default(),
        })
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .open
            .len()
    }
}

/// One connection counted as waiting in `admit_within`, until dropped.
struct Waiting<'a> {
    table: &'a ConnTable,
    client: IpAddr,
    /// The id the next admitted connection gets when this one began to wait.
    ticket: u64,
}

impl<'a> Waiting<'a> {
    fn join(table: &'a ConnTable, client: IpAddr) -> Option<Self> {
        let mut inner = table.inner.lock().unwrap_or_else(|e| e.into_inner());
        let of_client = inner.waiting_per_client.get(&client).copied().unwrap_or(0);
        if table.waiting.load(Ordering::SeqCst) >= MAX_WAITING
            || of_client >= MAX_WAITING_PER_CLIENT
        {
            return None;
        }
        *inner.waiting_per_client.entry(client).or_insert(0) += 1;
        table.waiting.fetch_add(1, Ordering::SeqCst);
        Some(Waiting {
            table,
            client,
            ticket: inner.next_id,
        })
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut inner = self.table.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = inner.waiting_per_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                inner.waiting_per_client.remove(&self.client);
            }
        }
        self.table.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Inner {
    /// Removes the oldest connection that is waiting or reading a body (of `client`, if
    /// given; admitted before the id `before`, if given) and tells it to close; false if
    /// there is none.
    fn evict_oldest(&mut self, client: Option<IpAddr>, before: Option<u64>) -> bool {
        let victim = self
            .open
            .range(..before.unwrap_or(u64::MAX))
            .filter(|(_, e)| client.is_none_or(|c| e.client == c))
            .find(|(_, e)| {
                [Phase::Waiting, Phase::ReadingBody].iter().any(|&p| {
                    e.phase
                        .compare_exchange(p as u8, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                })
            })
            .map(|(id, _)| *id);
        match victim {
            Some(id) => {
                if let Some(entry) = self.remove(id) {
                    // A stored permit: the connection sees it even if it is not waiting
                    // on it at this instant.
                    entry.evict.notify_one();
                }
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.open.remove(&id)?;
        if let Some(n) = self.per_client.get_mut(&entry.client) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&entry.client);
            }
        }
        Some(entry)
    }
}

impl ConnGuard {
    /// Moves the connection to `phase`; false if it has been evicted, in which case it
    /// must serve nothing more (its place has gone to a newer connection).
    pub fn enter(&self, phase: Phase) -> bool {
        enter(&self.phase, phase)
    }

    /// Its response has been handed over: waiting again (false if evicted).
    pub fn answered(&self) -> bool {
        self.answered_ms
            .store(crate::token::mono_ms(), Ordering::Release);
        let waiting = self.enter(Phase::Waiting);
        if waiting {
            self.table.room_may_be_free();
        }
        waiting
    }

    /// Whether its last response was handed over within `within` (it may still be in
    /// the connection's write buffer).
    pub fn answered_within(&self, within: std::time::Duration) -> bool {
        let at = self.answered_ms.load(Ordering::Acquire);
        at != 0 && crate::token::mono_ms() - at <= within.as_millis() as i64
    }

    /// The phase of this connection as its HTTP/2 streams set it.
    pub fn stream_count(&self) -> Arc<StreamCount> {
        Arc::new(StreamCount {
            phase: self.phase.clone(),
            streams: Mutex::new(0),
        })
    }

    /// Resolves once the connection has been evicted to make room for a newer one.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut inner = self.table.inner.lock().unwrap_or_else(|e| e.into_inner());
        let freed = inner.remove(self.id).is_some();
        self.table.counts.open.set(inner.open.len() as i64);
        drop(inner);
        // An evicted connection's place was taken already.
        if freed {
            self.table.room_may_be_free();
        }
    }
}

fn enter(current: &AtomicU8, phase: Phase) -> bool {
    let mut now = current.load(Ordering::Acquire);
    loop {
        if now == EVICTED {
            return false;
        }
        match current.compare_exchange_weak(now, phase as u8, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(actual) => now = actual,
        }
    }
}

/// The streams of one HTTP/2 connection being served: the connection is busy from the
/// first one's start to the last one's end, waiting otherwise. The count and the phase
/// change together under one lock, so a stream ending never marks the connection waiting
/// while another is being served.
pub struct StreamCount {
    phase: Arc<AtomicU8>,
    streams: Mutex<usize>,
}

impl StreamCount {
    /// A stream starts. On a connection evicted to make room it is served all the same:
    /// such a connection drains (GOAWAY, then the streams the client sent before it).
    pub fn begin(&self) {
        let mut n = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        if *n == 0 {
            enter(&self.phase, Phase::Busy);
        }
        *n += 1;
    }

    /// A stream that `begin` admitted has ended.
    pub fn end(&self) {
        let mut n = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            enter(&self.phase, Phase::Waiting);
        }
    }
}

/// A stream `StreamCount::begin` admitted, ended when dropped (with the request's
/// context, however the request ends).
pub struct StreamGuard(pub Arc<StreamCount>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// The HTTP/2 connections being served, by the address of their shared socket digest
/// (one per connection, the same `Arc` in every stream's session): how a stream finds
/// its connection's [`StreamCount`].
#[derive(Default)]
pub struct H2Conns(dashmap::DashMap<usize, Arc<StreamCount>>);

impl H2Conns {
    pub fn insert(&self, digest: usize, count: Arc<StreamCount>) {
        self.0.insert(digest, count);
    }

    pub fn get(&self, digest: usize) -> Option<Arc<StreamCount>> {
        self.0.get(&digest).map(|c| c.clone())
    }

    /// Removes `count`, unless the address has been taken by a newer connection since.
    pub fn remove(&self, digest: usize, count: &Arc<StreamCount>) {
        self.0.remove_if(&digest, |_, c| Arc::ptr_eq(c, count));
    }
}

/// An IPv4 client seen through an IPv6 socket counts as itself.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    /// A table with these bounds (0: none per client).
    fn table(max_total: usize, max_per_client: usize) -> Arc<ConnTable> {
        ConnTable::new(
            "test",
            ConnLimits {
                max_total,
                max_per_client,
            },
        )
    }

    /// A table of two places, both taken by connections serving a request.
    fn two_busy_places() -> (Arc<ConnTable>, ConnGuard, ConnGuard) {
        let table = table(2, 0);
        let a = table.admit(ip(1)).unwrap();
        let b = table.admit(ip(1)).unwrap();
        assert!(a.enter(Phase::Busy) && b.enter(Phase::Busy));
        (table, a, b)
    }

    #[tokio::test]
    async fn at_the_bound_the_oldest_waiting_connection_makes_room() {
        let table = table(3, 0);
        let a = table.admit(ip(1)).unwrap();
        let b = table.admit(ip(1)).unwrap();
        let c = table.admit(ip(2)).unwrap();
        assert!(a.enter(Phase::Busy)); // never evicted
        let d = table.admit(ip(3)).unwrap();
        assert_eq!(table.open(), 3);
        // b, the oldest waiting one, was told to close; c and d were not.
        tokio::time::timeout(std::time::Duration::from_millis(100), b.evicted())
            .await
            .expect("b evicted");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), c.evicted())
                .await
                .is_err()
        );
        assert!(c.enter(Phase::Busy));
        assert!(d.enter(Phase::Busy));
        // Everyone busy: a new connection is refused.
        assert_eq!(table.admit(ip(4)).err(), Some(Refused::Full));
        drop(b);
        assert_eq!(
            table.open(),
            3,
            "an evicted guard's drop frees nothing twice"
        );
        drop(a);
        assert!(table.admit(ip(4)).is_ok());
    }

    #[tokio::test]
    async fn with_every_place_busy_a_newcomer_waits_for_the_next_request_to_finish() {
        use std::time::Duration;
        let (table, a, b) = two_busy_places();
        let soon = || tokio::time::Instant::now() + Duration::from_millis(100);
        // Nobody finishes in time: refused when the deadline passes.
        assert_eq!(
            table.admit_within(ip(2), soon()).await.err(),
            Some(Refused::Full)
        );
        // b finishes its request while the newcomer waits: b makes room.
        let waiting = tokio::spawn({
            let table = table.clone();
            async move {
                table
                    .admit_within(ip(2), soon() + Duration::from_secs(5))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        assert!(b.answered());
        let newcomer = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("admitted once a place is free")
            .unwrap()
            .expect("admitted");
        tokio::time::timeout(Duration::from_millis(100), b.evicted())
            .await
            .expect("b evicted");
        assert!(newcomer.enter(Phase::Busy));
        // A connection that closes makes room the same way.
        let waiting = tokio::spawn({
            let table = table.clone();
            async move {
                table
                    .admit_within(ip(3), soon() + Duration::from_secs(5))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(a);
        let third = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap()
            .expect("admitted once a connection closed");
        assert!(third.enter(Phase::Busy));
        // How many may wait is bounded: per client, beyond it refused at once.
        let busy_deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let waiters: Vec<_> = (0..MAX_WAITING_PER_CLIENT)
            .map(|_| {
                let table = table.clone();
                tokio::spawn(async move { table.admit_within(ip(4), busy_deadline).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = std::time::Instant::now();
        assert!(table.admit_within(ip(4), busy_deadline).await.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused at once"
        );
        for w in waiters {
            w.abort();
        }
    }

    #[tokio::test]
    async fn waiters_take_the_places_that_free_up_one_each_never_each_others() {
        use std::time::Duration;
        let (table, a, b) = two_busy_places();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let spawn_waiter = |last: u8| {
            let table = table.clone();
            tokio::spawn(async move { table.admit_within(ip(last), deadline).await })
        };
        let (w1, w2) = (spawn_waiter(2), spawn_waiter(3));
        tokio::time::sleep(Duration::from_millis(30)).await;
        // One place frees up: one waiter gets it, and keeps it (still waiting for its
        // request header, as after a TLS handshake) while the other waits on.
        assert!(b.answered());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(w1.is_finished() != w2.is_finished(), "exactly one admitted");
        let (first, second) = if w1.is_finished() { (w1, w2) } else { (w2, w1) };
        let first = first.await.unwrap().expect("admitted");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), first.evicted())
                .await
                .is_err(),
            "the other waiter did not take its place"
        );
        // A second place frees up: the second waiter gets it.
        assert!(a.answered());
        let second = tokio::time::timeout(Duration::from_secs(1), second)
            .await
            .expect("admitted once a second place is free")
            .unwrap()
            .expect("admitted");
        assert!(first.enter(Phase::Busy) && second.enter(Phase::Busy));
        assert_eq!(table.open(), 2);
    }

    #[tokio::test]
    async fn a_client_at_its_bound_evicts_its_own_oldest_waiting_connection() {
        let table = table(100, 2);
        let other = table.admit(ip(9)).unwrap();
        let a = table.admit(ip(1)).unwrap();
        let _b = table.admit(ip(1)).unwrap();
        let _c = table.admit(ip(1)).unwrap();
        tokio::time::timeout(std::time::Duration::from_millis(100), a.evicted())
            .await
            .expect("a evicted");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), other.evicted())
                .await
                .is_err(),
            "another client's connection is untouched"
        );
        assert_eq!(table.open(), 3);
        assert!(_b.enter(Phase::Busy));
        assert!(_c.enter(Phase::Busy));
        assert_eq!(table.admit(ip(1)).err(), Some(Refused::ClientFull));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(table.admit(mapped).err(), Some(Refused::ClientFull));
    }

    #[tokio::test]
    async fn a_connection_reading_a_body_makes_room_and_an_evicted_one_never_turns_busy() {
        let table = table(2, 0);
        let slow_body = table.admit(ip(1)).unwrap();
        let handler = table.admit(ip(2)).unwrap();
        assert!(slow_body.enter(Phase::ReadingBody));
        assert!(handler.enter(Phase::ReadingBody));
        assert!(handler.enter(Phase::Busy));
        // The busy one (its handler running) stays; the one still reading its body goes.
        let fresh = table.admit(ip(3)).unwrap();
        tokio::time::timeout(std::time::Duration::from_millis(100), slow_body.evicted())
            .await
            .expect("the body reader evicted");
        assert!(
            !slow_body.enter(Phase::Busy),
            "an evicted connection must not start a handler"
        );
        assert!(!slow_body.enter(Phase::Waiting));
        assert_eq!(table.open(), 2);
        // The fresh one reads its body and is served; nothing is left to evict.
        assert!(fresh.enter(Phase::ReadingBody));
        assert!(fresh.enter(Phase::Busy));
        assert_eq!(table.admit(ip(4)).err(), Some(Refused::Full));
        // Served and waiting for its next request: evictable again.
        assert!(handler.enter(Phase::Waiting));
        assert!(table.admit(ip(4)).is_ok());
        assert!(!handler.enter(Phase::Busy));
    }

    #[tokio::test]
    async fn an_http2_connection_makes_room_only_between_its_streams() {
        let table = table(1, 0);
        let h2 = table.admit(ip(1)).unwrap();
        let streams = h2.stream_count();
        streams.begin();
        streams.begin();
        streams.end();
        // One stream still being served: busy, never evicted.
        assert_eq!(table.admit(ip(2)).err(), Some(Refused::Full));
        streams.end();
        // Between streams it waits like an idle HTTP/1.1 connection: it makes room (told
        // to close, it drains: a stream still starting is served, the place stays given).
        let newer = table
            .admit(ip(2))
            .expect("the idle HTTP/2 connection made room");
        tokio::time::timeout(std::time::Duration::from_millis(100), h2.evicted())
            .await
            .expect("told to close");
        streams.begin();
        streams.end();
        assert_eq!(
            table.open(),
            1,
            "the evicted connection's place stays given"
        );
        drop(newer);
    }
}
