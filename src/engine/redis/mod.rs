//! The Redis engine: one store shared by every process that opens the same
//! server and namespace. Each change is one Lua script (see `scripts.rs`
//! for the keys and why scripts); this file turns the API into script
//! calls and keeps a small connection pool and a cache of bulk sends.
//!
//! A drain is a lease and its commit, two scripts: if the connection breaks
//! after the first, the messages come back when the lease times out instead
//! of being lost; a commit whose reply was lost is retried, and the retry
//! sees the `done` mark of the first try.
//!
//! Expiry and replace keys are judged here, in the client, with
//! [`shown`](super::shown) and the store's clock: the scripts hand over
//! everything a read takes, and the client hides what is not to be shown
//! (a lease still holds it, so that its commit removes it). Each process
//! thus judges expiry by its own clock. A background thread per handle
//! (`reaper`) removes what has expired every
//! [`REAP_EVERY`](super::REAP_EVERY); another (`live`, started by the
//! first watch) relays other processes' sends to this process's watchers.

mod live;
mod pool;
mod scripts;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::{Script, Value};

use self::pool::Pool;
use super::{Common, EmptyLease, Engine, LeaseState, Outgoing, keep_shown};
use crate::message::{BulkSend, MessageId, now_ms};
use crate::recipients::Recipients;
use crate::record::{self, QuarantinedRecord, Record};
use crate::{Error, Message, Result, UserId, key};

/// How long a connect, a read or a write may take before the call fails
/// with [`Error::Redis`].
pub(crate) const TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct RedisEngine {
    shared: Arc<Shared>,
}

struct Shared {
    pool: Pool,
    ns: String,
    common: Common,
    scripts: Scripts,
    bulks: Mutex<BulkCache>,
    tokens: Tokens,
    /// Whether the live subscriber thread runs (see `live.rs`).
    live: Mutex<bool>,
}

struct Scripts {
    send: Script,
    bulk: Script,
    lease: Script,
    commit: Script,
    release: Script,
    peek: Script,
    any: Script,
    quarantine: Script,
    reap: Script,
    replace_own: Script,
    replace_bulk: Script,
}

/// The live bulk sends this process has read, by id. Bulk sends get their
/// id when they commit, so "every bulk send up to `known`" is a complete
/// list; the scripts answer `stale` when a newer one exists.
#[derive(Default)]
struct BulkCache {
    /// The data set the cache was read from (`ns:epoch`).
    epoch: String,
    known: u64,
    bulks: BTreeMap<u64, Arc<CachedBulk>>,
    /// `ns:rk`: the newest keyed announcement's id per replace key.
    replaced: Arc<Replaced>,
}

/// The cached bulk sends that list one user, with their ids as fields.
type Candidates = Vec<(String, Arc<CachedBulk>)>;

/// Replace key -> id of the newest announcement with it: it replaces every
/// older message with the key, for every user who has not taken it; once
/// it has expired, for every user.
type Replaced = HashMap<String, u64>;

/// What a read script ran with: the cache's state and the bulk sends that
/// list the user.
struct Snapshot {
    /// '(' ‖ the newest bulk id the cache knows.
    known: String,
    epoch: String,
    candidates: Candidates,
    replaced: Arc<Replaced>,
}

impl Snapshot {
    fn bulk(&self, f: &str) -> Option<&Arc<CachedBulk>> {
        self.candidates
            .iter()
            .find(|(c, _)| c == f)
            .map(|(_, bulk)| bulk)
    }
}

struct CachedBulk {
    message: Outgoing,
    /// An announcement: every user is a recipient (`recipients` is empty;
    /// the users who took it are in `ns:bt:F`).
    everyone: bool,
    recipients: Recipients,
}

impl CachedBulk {
    /// Whether a read of `user`'s queue looks at it. An expired one is
    /// still taken, unshown (until the reaper removes it), so that its
    /// replace key does what it does in the other engines' queues.
    fn lists(&self, user: &UserId) -> bool {
        self.everyone || self.recipients.contains(user)
    }

    /// The commit script's count for it: recipients, or `*` ‖ its replace
    /// key for an announcement (never removed by a commit).
    fn commit_count(&self) -> String {
        if self.everyone {
            format!("*{}", self.message.replace_key.as_deref().unwrap_or(""))
        } else {
            self.recipients.len().to_string()
        }
    }
}

/// Keeps the messages that [`shown`](super::shown) keeps, in order, less those that a
/// newer keyed announcement (`ns:rk`) replaced, where the announcement is
/// not in the read itself (then `shown` decides), has not been taken by
/// the user (`took`, their `ns:took:u`: once delivered, a key is free
/// again), and has expired or is gone (while it is there and unexpired,
/// the user holds it in another lease).
fn only_shown(
    messages: Vec<Message>,
    now_ms: u64,
    snapshot: &Snapshot,
    took: &Replaced,
) -> Vec<Message> {
    let ids: std::collections::HashSet<u64> = messages.iter().map(|m| m.id().0).collect();
    keep_shown(messages, now_ms)
        .into_iter()
        .filter(|message| {
            let gone = message.replace_key().is_some_and(|key| {
                snapshot.replaced.get(key).is_some_and(|newer| {
                    *newer > message.id().0
                        && !ids.contains(newer)
                        && took.get(key).is_none_or(|taken| taken < newer)
                        && snapshot
                            .bulk(&field(*newer))
                            .is_none_or(|bulk| bulk.message.expired(now_ms))
                })
            });
            !gone
        })
        .collect()
}

/// An expiry time as a script argument ('' for none).
fn expiry_arg(message: &Outgoing) -> String {
    message
        .expires_at_ms
        .map_or_else(String::new, |at| at.to_string())
}

/// Lease tokens: unique across processes (a random start) and within one.
struct Tokens(AtomicU64);

impl Tokens {
    fn new() -> Tokens {
        let seed = RandomState::new().hash_one(now_ms()) % 1_000_000_000_000;
        Tokens(AtomicU64::new(seed * 10_000_000))
    }

    fn next(&self) -> String {
        field(self.0.fetch_add(1, Ordering::Relaxed) % 10_u64.pow(19))
    }
}

/// An id as a hash field: 20 digits, so that byte order is id order.
fn field(id: u64) -> String {
    format!("{id:020}")
}

fn parse_field(bytes: &[u8]) -> Option<u64> {
    if bytes.len() != 20 {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

impl RedisEngine {
    pub(crate) fn open(url: &str, namespace: &str, common: Common) -> Result<RedisEngine> {
        let pool = Pool::new(url)?;
        let shared = Shared {
            pool,
            ns: namespace.to_owned(),
            common,
            scripts: Scripts {
                send: Script::new(&scripts::send()),
                bulk: Script::new(scripts::BULK),
                lease: Script::new(&scripts::lease()),
                commit: Script::new(&scripts::commit()),
                release: Script::new(&scripts::release()),
                peek: Script::new(&scripts::peek()),
                any: Script::new(&scripts::any()),
                quarantine: Script::new(scripts::QUARANTINE),
                reap: Script::new(&scripts::reap()),
                replace_own: Script::new(scripts::REPLACE_OWN),
                replace_bulk: Script::new(&scripts::replace_bulk()),
            },
            bulks: Mutex::new(BulkCache::default()),
            tokens: Tokens::new(),
            live: Mutex::new(false),
        };
        // Fails now, with the URL, if the server cannot be reached.
        shared.pool.run(|con| redis::cmd("PING").query::<()>(con))?;
        let shared = Arc::new(shared);
        start_reaper(Arc::downgrade(&shared));
        Ok(RedisEngine { shared })
    }
}

/// How many expired entries one run of the reap script removes (about
/// 1.5 ms of the server's time: 100,000 took 200 runs of 500 at 3.9 ms
/// each); a tick runs it again while it finds a full batch, up to
/// `REAP_BATCHES` times.
const REAP_BATCH: usize = 200;
const REAP_BATCHES: usize = 500;

/// Removes expired messages every [`REAP_EVERY`](super::REAP_EVERY) until
/// the engine is dropped (it holds the engine only while reaping).
fn start_reaper(shared: Weak<Shared>) {
    let spawned = std::thread::Builder::new()
        .name("async-messages-redis-reaper".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                std::thread::sleep(super::REAP_EVERY);
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                match shared.reap() {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!(url = shared.pool.url(), "the reaper reaches Redis again");
                    }
                    Ok(()) => {}
                    // Once per outage: reads never show expired messages,
                    // whenever they are removed.
                    Err(error) if !failing => {
                        failing = true;
                        tracing::warn!(%error, "could not remove expired messages; trying again every second");
                    }
                    Err(_) => {}
                }
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "could not start the Redis store's reaper thread; expired messages are hidden but not removed");
    }
}

impl Shared {
    fn key(&self, kind: &str, tail: &[u8]) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.ns.len() + kind.len() + tail.len() + 2);
        key.extend_from_slice(self.ns.as_bytes());
        key.push(b':');
        key.extend_from_slice(kind.as_bytes());
        if !tail.is_empty() {
            key.push(b':');
            key.extend_from_slice(tail);
        }
        key
    }

    /// Runs `call` with the cache's state and the bulk sends that `which`
    /// picks, refreshing the cache and trying again while it answers
    /// `None` (the script said `stale`).
    fn with_snapshot<T>(
        &self,
        which: impl Fn(&CachedBulk) -> bool,
        mut call: impl FnMut(Snapshot) -> Result<Option<T>>,
    ) -> Result<T> {
        loop {
            let snapshot = {
                let cache = self.bulks.lock();
                Snapshot {
                    known: format!("({}", cache.known),
                    epoch: cache.epoch.clone(),
                    candidates: cache
                        .bulks
                        .iter()
                        .filter(|(_, bulk)| which(bulk))
                        .map(|(id, bulk)| (field(*id), bulk.clone()))
                        .collect(),
                    replaced: cache.replaced.clone(),
                }
            };
            if let Some(done) = call(snapshot)? {
                return Ok(done);
            }
            self.refresh_bulks()?;
        }
    }

    /// Runs one of the scripts that read a user's queue (lease, peek, any):
    /// KEYS q, l, bulks; ARGV ns, u, `extra`, '(' ‖ the newest bulk id in
    /// the cache, the cache's epoch, then the cached bulk sends that list
    /// the user. Refreshes the cache and runs it again while the script
    /// answers `stale`.
    fn run_for_user(
        &self,
        script: &Script,
        user: &UserId,
        u: &[u8],
        extra: &[&str],
    ) -> Result<(Value, Snapshot)> {
        let (q, l, bulks) = (self.key("q", u), self.key("l", u), self.key("bulks", b""));
        self.with_snapshot(
            |bulk| bulk.lists(user),
            |snapshot| {
                let mut call = script.prepare_invoke();
                call.key(&q).key(&l).key(&bulks).arg(&self.ns).arg(u);
                for arg in extra {
                    call.arg(*arg);
                }
                call.arg(&snapshot.known).arg(&snapshot.epoch);
                for (f, _) in &snapshot.candidates {
                    call.arg(f);
                }
                let reply: Value = self.pool.run(|con| call.invoke(con))?;
                Ok((!is_stale(&reply)).then_some((reply, snapshot)))
            },
        )
    }

    /// Reads the live bulk sends: new ones are fetched and decoded, gone
    /// ones dropped.
    fn refresh_bulks(&self) -> Result<()> {
        // The data set's name: made by the first client to look (again,
        // after the server lost its data, which also empties the cache).
        let epoch_key = self.key("epoch", b"");
        let fresh = self.tokens.next();
        let epoch: String = self.pool.run(|con| {
            redis::pipe()
                .cmd("SET")
                .arg(&epoch_key)
                .arg(&fresh)
                .arg("NX")
                .ignore()
                .cmd("GET")
                .arg(&epoch_key)
                .query::<(String,)>(con)
                .map(|(epoch,)| epoch)
        })?;
        {
            let mut cache = self.bulks.lock();
            if cache.epoch != epoch {
                *cache = BulkCache {
                    epoch: epoch.clone(),
                    ..BulkCache::default()
                };
            }
        }
        let bulks_key = self.key("bulks", b"");
        let id_key = self.key("id", b"");
        // The id counter first: every bulk send with an id up to it was
        // added before the ZRANGE ran (a send takes its id and joins
        // ns:bulks in one script), so one of those missing from the list
        // is gone (taken by all, or expired).
        // The keys' marks last: every mark up to the id counter or a listed
        // bulk send is in it.
        let rk_key = self.key("rk", b"");
        type Listing = (Option<u64>, Vec<(String, f64)>, HashMap<String, String>);
        let (horizon, live, marks): Listing = self.pool.run(|con| {
            redis::pipe()
                .cmd("GET")
                .arg(&id_key)
                .cmd("ZRANGE")
                .arg(&bulks_key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .cmd("HGETALL")
                .arg(&rk_key)
                .query(con)
        })?;
        let marks: Replaced = marks
            .into_iter()
            .filter_map(|(key, f)| Some((key, parse_field(f.as_bytes())?)))
            .collect();
        let horizon = horizon.unwrap_or(0);
        let ids: Vec<u64> = live.iter().filter_map(|(f, _)| f.parse().ok()).collect();
        let missing: Vec<u64> = {
            let cache = self.bulks.lock();
            ids.iter()
                .copied()
                .filter(|id| !cache.bulks.contains_key(id))
                .collect()
        };
        let mut fetched = Vec::new();
        let keys: Vec<Vec<u8>> = missing
            .iter()
            .map(|id| self.key("b", field(*id).as_bytes()))
            .collect();
        let records: Vec<Option<Vec<u8>>> = if keys.is_empty() {
            Vec::new()
        } else {
            self.pool
                .run(|con| redis::cmd("MGET").arg(&keys).query(con))?
        };
        for ((id, record_key), bytes) in missing.into_iter().zip(&keys).zip(records) {
            let Some(bytes) = bytes else { continue };
            match record::decode_bulk(&bytes) {
                Ok(bulk) => fetched.push((
                    id,
                    Arc::new(CachedBulk {
                        message: bulk.message,
                        everyone: bulk.everyone,
                        recipients: bulk.recipients,
                    }),
                )),
                Err(reason) => {
                    tracing::warn!(id, %reason, "moving a damaged bulk send to quarantine");
                    self.quarantine(record_key, "", &bytes, &reason, "bulk", &field(id))?;
                }
            }
        }
        let mut cache = self.bulks.lock();
        if cache.epoch != epoch {
            // Another refresh found a new data set meanwhile: this snapshot
            // is of the old one (the script will ask again).
            return Ok(());
        }
        // Refreshes can overlap: a bulk send newer than this snapshot was
        // added by a later one (or by this process's own send) and stays;
        // an older one missing from it is gone.
        let newest = ids.iter().copied().max().unwrap_or(0).max(horizon);
        let live: std::collections::HashSet<u64> = ids.into_iter().collect();
        cache
            .bulks
            .retain(|id, _| *id > newest || live.contains(id));
        cache.bulks.extend(fetched);
        cache.known = cache.known.max(newest);
        // Marks only grow (a newer announcement's id replaces an older);
        // this process's own, newer than the snapshot, stay.
        let mut merged = (*cache.replaced).clone();
        for (key, id) in marks {
            let entry = merged.entry(key).or_insert(id);
            *entry = (*entry).max(id);
        }
        cache.replaced = Arc::new(merged);
        Ok(())
    }

    fn quarantine(
        &self,
        hash: &[u8],
        f: &str,
        value: &[u8],
        reason: &str,
        tree: &str,
        id: &str,
    ) -> Result<()> {
        let entry = record::encode_quarantined(&QuarantinedRecord {
            tree: tree.to_owned(),
            key: [hash, b":", f.as_bytes()].concat(),
            value: value.to_vec(),
            reason: reason.to_owned(),
            at_ms: now_ms(),
        });
        let list = self.key("quarantine", b"");
        let bulks = self.key("bulks", b"");
        self.pool.run(|con| {
            self.scripts
                .quarantine
                .key(hash)
                .key(&list)
                .key(&bulks)
                .arg(f)
                .arg(&entry)
                .arg(id)
                .invoke::<()>(con)
        })
    }

    fn lease(self: &Arc<Self>, user: &UserId) -> Result<Option<RedisLease>> {
        let u = key::user_prefix(user)?;
        let l = self.key("l", &u);
        let token = self.tokens.next();
        let timeout_ms = self.common.lease_timeout.as_millis().max(1).to_string();
        let (reply, snapshot) =
            self.run_for_user(&self.scripts.lease, user, &u, &[&token, &timeout_ms])?;
        let (own, taken, took) = match reply {
            Value::Array(parts) if parts.len() == 3 => {
                let mut parts = parts.into_iter();
                let own = parts.next().unwrap_or_default();
                let taken = parts.next().unwrap_or_default();
                let took = parts.next().unwrap_or_default();
                (pairs(own), strings(taken), took_map(took))
            }
            other => return Err(self.unexpected(&other)),
        };
        if own.is_empty() && taken.is_empty() {
            return Ok(None);
        }
        let mut lease = RedisLease {
            shared: self.clone(),
            user: user.clone(),
            prefix: u,
            token,
            entries: Vec::new(),
            messages: Vec::new(),
            open: true,
        };
        let mut damaged = None;
        for (f, value) in own {
            let Some(id) = parse_field(&f) else {
                damaged.get_or_insert((f, value, "the field is not a message id".to_owned()));
                continue;
            };
            match record::decode_record(&value) {
                Ok(Record::Inline(message)) => {
                    lease.entries.push(LeaseEntry {
                        f: field(id),
                        count: "0".to_owned(),
                        key: message.replace_key.clone().unwrap_or_default(),
                    });
                    lease.messages.push(message.into_message(id));
                }
                Ok(_) => {
                    damaged.get_or_insert((f, value, "not a message record".to_owned()));
                }
                Err(reason) => {
                    damaged.get_or_insert((f, value, reason));
                }
            }
        }
        for f in taken {
            let Some(bulk) = snapshot.bulk(&f) else {
                continue;
            };
            let id = parse_field(f.as_bytes()).unwrap_or_default();
            lease.entries.push(LeaseEntry {
                f,
                count: bulk.commit_count(),
                key: bulk.message.replace_key.clone().unwrap_or_default(),
            });
            lease.messages.push(bulk.message.message(id));
        }
        if let Some((f, value, reason)) = damaged {
            // As on sled: the damaged record goes to quarantine, nothing is
            // taken, and the next call returns the rest.
            let f = String::from_utf8_lossy(&f).into_owned();
            self.quarantine(&l, &f, &value, &reason, "messages", "")?;
            drop(lease);
            return Err(Error::Corrupt {
                what: format!("for user {user} (message {f})"),
                reason,
            });
        }
        lease.messages.sort_by_key(|m| m.id);
        // Expired and replaced ones stay in the lease, unshown: the commit
        // removes them with the rest.
        lease.messages = only_shown(
            std::mem::take(&mut lease.messages),
            self.common.now_ms(),
            &snapshot,
            &took,
        );
        Ok(Some(lease))
    }

    /// Runs the send script for a few users; returns the id and how many
    /// got it. A keyed send also takes the users' older bulk sends and
    /// announcements with the key out of their reach, which needs a cache
    /// that knows them all: it runs again after a refresh while the script
    /// answers `stale`.
    fn send_few(&self, users: &[UserId], message: &Outgoing) -> Result<(u64, u64)> {
        let value = record::encode_inline(message);
        let prefixes = users
            .iter()
            .map(key::user_prefix)
            .collect::<Result<Vec<_>>>()?;
        let sent = self.key("sent", self.tokens.next().as_bytes());
        let rkey = message.replace_key.as_deref();
        let run = |snapshot: Option<&Snapshot>| -> Result<Value> {
            let mut call = self.scripts.send.prepare_invoke();
            call.key(self.key("id", b""))
                .key(&sent)
                .key(self.key("exp", b""))
                .key(self.key("bulks", b""));
            for u in &prefixes {
                call.key(self.key("q", u));
            }
            call.arg(&self.ns)
                .arg(&value)
                .arg(expiry_arg(message))
                .arg(rkey.unwrap_or(""));
            match snapshot {
                Some(snapshot) => call.arg(&snapshot.known).arg(&snapshot.epoch),
                None => call.arg("").arg(""),
            };
            for u in &prefixes {
                call.arg(u);
            }
            for (f, bulk) in snapshot.map_or(&[][..], |s| &s.candidates[..]) {
                for (i, user) in users.iter().enumerate() {
                    if bulk.everyone || bulk.recipients.contains(user) {
                        call.arg(i + 1).arg(f).arg(bulk.commit_count());
                    }
                }
            }
            self.pool.run(|con| call.invoke(con))
        };
        let reply = match rkey {
            None => run(None)?,
            Some(rkey) => self.with_snapshot(
                |bulk| bulk.message.replace_key.as_deref() == Some(rkey),
                |snapshot| {
                    let reply = run(Some(&snapshot))?;
                    Ok((!is_stale(&reply)).then_some(reply))
                },
            )?,
        };
        redis::from_redis_value::<(u64, u64)>(reply.clone()).map_err(|_| self.unexpected(&reply))
    }

    /// Stores a bulk send (or, with `everyone`, an announcement) as one
    /// record; returns its id.
    fn store_bulk(&self, message: &Outgoing, everyone: bool, users: Recipients) -> Result<u64> {
        let value = record::encode_bulk(message, everyone, &users);
        let (id_key, bulks) = (self.key("id", b""), self.key("bulks", b""));
        let sent = self.key("sent", self.tokens.next().as_bytes());
        let exp = self.key("exp", b"");
        let expires = expiry_arg(message);
        let rkey = message.replace_key.as_deref();
        // An announcement's key is marked for every user; a bulk send's
        // is applied to its recipients below.
        let mark = if everyone { rkey.unwrap_or("") } else { "" };
        let id: u64 = self.pool.run(|con| {
            self.scripts
                .bulk
                .key(&id_key)
                .key(&bulks)
                .key(&sent)
                .key(&exp)
                .arg(&self.ns)
                .arg(&value)
                .arg(&expires)
                .arg(mark)
                .invoke(con)
        })?;
        let bulk = Arc::new(CachedBulk {
            message: message.clone(),
            everyone,
            recipients: users,
        });
        // This process knows the record already: no fetch on its next read
        // (`known` stays, so bulk sends committed in between are still fetched).
        {
            let mut cache = self.bulks.lock();
            cache.bulks.insert(id, bulk.clone());
            if !mark.is_empty() {
                let mut replaced = (*cache.replaced).clone();
                let newest = replaced.entry(mark.to_owned()).or_insert(id);
                *newest = (*newest).max(id);
                cache.replaced = Arc::new(replaced);
            }
        }
        if let (Some(rkey), false) = (rkey, everyone) {
            // Not atomic with the send (it touches every recipient), but
            // reads hide the replaced messages meanwhile.
            if let Err(error) = self.replace_for_bulk(id, rkey, &bulk.recipients) {
                tracing::warn!(%error, id, "a keyed bulk send could not remove every recipient's older message with its key; reads hide them while it lives");
            }
        }
        Ok(id)
    }

    /// After keyed bulk send `id`: removes each recipient's queued own
    /// record with the key, and takes older bulk sends and announcements
    /// with the key out of their reach, in chunks.
    fn replace_for_bulk(&self, id: u64, rkey: &str, recipients: &Recipients) -> Result<()> {
        const CHUNK: usize = 1000;
        let f = field(id);
        let exp = self.key("exp", b"");
        let users: Vec<(UserId, Vec<u8>)> = recipients
            .users()
            .filter_map(|user| {
                let u = key::user_prefix(&user).ok()?;
                Some((user, u))
            })
            .collect();
        for chunk in users.chunks(CHUNK) {
            self.pool.run(|con| {
                let mut call = self.scripts.replace_own.prepare_invoke();
                call.key(&exp).arg(&self.ns).arg(rkey).arg(&f);
                for (_, u) in chunk {
                    call.arg(u);
                }
                call.invoke::<()>(con)
            })?;
        }
        // The cache then knows every bulk send older than this one.
        self.refresh_bulks()?;
        let older: Vec<(u64, Arc<CachedBulk>)> = self
            .bulks
            .lock()
            .bulks
            .range(..id)
            .filter(|(_, bulk)| bulk.message.replace_key.as_deref() == Some(rkey))
            .map(|(older, bulk)| (*older, bulk.clone()))
            .collect();
        for (older, bulk) in older {
            let listed: Vec<&[u8]> = users
                .iter()
                .filter(|(user, _)| bulk.everyone || bulk.recipients.contains(user))
                .map(|(_, u)| u.as_slice())
                .collect();
            let (older, count) = (field(older), bulk.commit_count());
            for chunk in listed.chunks(CHUNK) {
                self.pool.run(|con| {
                    let mut call = self.scripts.replace_bulk.prepare_invoke();
                    call.arg(&self.ns).arg(&older).arg(&count);
                    for u in chunk {
                        call.arg(*u);
                    }
                    call.invoke::<()>(con)
                })?;
            }
        }
        Ok(())
    }

    /// Removes what has expired by this process's clock, in batches.
    fn reap(&self) -> Result<()> {
        let (exp, bulks) = (self.key("exp", b""), self.key("bulks", b""));
        let now = self.common.now_ms().to_string();
        let batch = REAP_BATCH.to_string();
        for _ in 0..REAP_BATCHES {
            let due: usize = self.pool.run(|con| {
                self.scripts
                    .reap
                    .key(&exp)
                    .key(&bulks)
                    .arg(&self.ns)
                    .arg(&now)
                    .arg(&batch)
                    .invoke(con)
            })?;
            if due < REAP_BATCH {
                break;
            }
        }
        Ok(())
    }

    fn unexpected(&self, reply: &Value) -> Error {
        Error::Redis {
            url: self.pool.url().to_owned(),
            source: format!("unexpected reply from a script: {reply:?}").into(),
        }
    }
}

fn is_stale(reply: &Value) -> bool {
    matches!(reply, Value::BulkString(b) if b == b"stale")
        || matches!(reply, Value::SimpleString(s) if s == "stale")
}

fn bytes(value: Value) -> Vec<u8> {
    match value {
        Value::BulkString(bytes) => bytes,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(n) => n.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

fn strings(value: Value) -> Vec<String> {
    match value {
        Value::Array(items) => items
            .into_iter()
            .map(|v| String::from_utf8_lossy(&bytes(v)).into_owned())
            .collect(),
        _ => Vec::new(),
    }
}

/// The user's `ns:took:u` from a flat `{key, F, ...}` reply.
fn took_map(value: Value) -> Replaced {
    pairs(value)
        .into_iter()
        .filter_map(|(key, f)| Some((String::from_utf8(key).ok()?, parse_field(&f)?)))
        .collect()
}

/// A flat `{field, value, ...}` reply as pairs.
fn pairs(value: Value) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut items = items.into_iter();
    while let (Some(f), Some(v)) = (items.next(), items.next()) {
        out.push((bytes(f), bytes(v)));
    }
    out
}

impl Engine for RedisEngine {
    fn describe(&self, f: &mut fmt::DebugStruct<'_, '_>) {
        f.field("engine", &"redis")
            .field("url", &self.shared.pool.url())
            .field("namespace", &self.shared.ns);
    }

    fn path(&self) -> &Path {
        Path::new("")
    }

    fn send(&self, user: &UserId, message: &Outgoing) -> Result<MessageId> {
        let sent = self.send_few(std::slice::from_ref(user), message, &mut |_| {})?;
        sent.id.ok_or_else(|| self.shared.unexpected(&Value::Nil))
    }

    fn send_few(
        &self,
        users: &[UserId],
        message: &Outgoing,
        progress: &mut dyn FnMut(u64),
    ) -> Result<BulkSend> {
        if users.is_empty() {
            return Ok(BulkSend::none());
        }
        let (id, recipients) = self.shared.send_few(users, message)?;
        progress(recipients);
        Ok(BulkSend {
            id: Some(MessageId(id)),
            recipients,
        })
    }

    fn send_bulk(&self, users: Recipients, message: &Outgoing) -> Result<BulkSend> {
        let recipients = users.len();
        let id = self.shared.store_bulk(message, false, users)?;
        Ok(BulkSend {
            id: Some(MessageId(id)),
            recipients,
        })
    }

    fn send_everyone(&self, message: &Outgoing) -> Result<MessageId> {
        let id = self
            .shared
            .store_bulk(message, true, Recipients::default())?;
        Ok(MessageId(id))
    }

    fn drain(&self, user: &UserId) -> Result<Vec<Message>> {
        match self.shared.lease(user)? {
            Some(lease) => Box::new(lease).commit(),
            None => Ok(Vec::new()),
        }
    }

    fn may_have(&self, user: &UserId) -> bool {
        let shared = &self.shared;
        let Ok(u) = key::user_prefix(user) else {
            return false;
        };
        let answer = shared.run_for_user(&shared.scripts.any, user, &u, &[]);
        // Unreachable: "maybe", so that the caller's drain reports the error.
        answer.map_or(true, |(reply, _)| !matches!(reply, Value::Int(0)))
    }

    fn may_have_is_local(&self) -> bool {
        false
    }

    fn start_live(&self) -> Result<()> {
        let mut started = self.shared.live.lock();
        if !*started {
            live::start(&self.shared)?;
            *started = true;
        }
        Ok(())
    }

    fn peek(&self, user: &UserId) -> Result<Vec<Message>> {
        let shared = &self.shared;
        let u = key::user_prefix(user)?;
        let (q, l) = (shared.key("q", &u), shared.key("l", &u));
        let (reply, snapshot) = shared.run_for_user(&shared.scripts.peek, user, &u, &[])?;
        let Value::Array(parts) = reply else {
            return Err(shared.unexpected(&reply));
        };
        let mut parts = parts.into_iter();
        let (queued, leased, untaken, took) = (
            pairs(parts.next().unwrap_or_default()),
            pairs(parts.next().unwrap_or_default()),
            strings(parts.next().unwrap_or_default()),
            took_map(parts.next().unwrap_or_default()),
        );
        let bulk_message = |f: &str| {
            let id = parse_field(f.as_bytes())?;
            let bulk = snapshot
                .bulk(f)
                .cloned()
                .or_else(|| shared.bulks.lock().bulks.get(&id).cloned())?;
            Some(bulk.message.message(id))
        };
        let mut messages = Vec::new();
        let records = queued.into_iter().map(|(f, v)| (f, v, &q)).chain(
            leased
                .into_iter()
                .filter_map(|(f, v)| match v.first() {
                    Some(b'd') if v.len() >= 41 => Some((f, v[41..].to_vec(), &l)),
                    Some(b'b') => {
                        let f = String::from_utf8_lossy(&f).into_owned();
                        messages.extend(bulk_message(&f));
                        None
                    }
                    _ => None,
                })
                .collect::<Vec<_>>(),
        );
        for (f, value, hash) in records {
            let decoded = match parse_field(&f) {
                None => Err("the field is not a message id".to_owned()),
                Some(id) => match record::decode_record(&value) {
                    Ok(Record::Inline(message)) => Ok(message.into_message(id)),
                    Ok(_) => Err("not a message record".to_owned()),
                    Err(reason) => Err(reason),
                },
            };
            match decoded {
                Ok(message) => messages.push(message),
                Err(reason) => {
                    let f = String::from_utf8_lossy(&f).into_owned();
                    if hash == &q {
                        shared.quarantine(hash, &f, &value, &reason, "messages", "")?;
                    }
                    return Err(Error::Corrupt {
                        what: format!("for user {user} (message {f})"),
                        reason,
                    });
                }
            }
        }
        messages.extend(untaken.iter().filter_map(|f| bulk_message(f)));
        messages.sort_by_key(|m| m.id);
        Ok(only_shown(
            messages,
            shared.common.now_ms(),
            &snapshot,
            &took,
        ))
    }

    fn lease(&self, user: &UserId) -> Result<Box<dyn LeaseState>> {
        Ok(match self.shared.lease(user)? {
            Some(lease) => Box::new(lease),
            None => Box::new(EmptyLease),
        })
    }

    fn users(&self) -> Result<Vec<UserId>> {
        let shared = &self.shared;
        let mut users = std::collections::BTreeSet::new();
        for kind in ["q", "l"] {
            let head = shared.key(kind, b"x");
            let head = &head[..head.len() - 1];
            let mut pattern = head.to_vec();
            pattern.push(b'*');
            let mut cursor = 0_u64;
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = shared.pool.run(|con| {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query(con)
                })?;
                for found in keys {
                    users.extend(found.strip_prefix(head).and_then(key::decode_user));
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        shared.refresh_bulks()?;
        for bulk in shared.bulks.lock().bulks.values() {
            users.extend(bulk.recipients.users());
        }
        Ok(users.into_iter().collect())
    }

    fn bulk_records(&self) -> Result<u64> {
        let bulks = self.shared.key("bulks", b"");
        self.shared
            .pool
            .run(|con| redis::cmd("ZCARD").arg(&bulks).query(con))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64> {
        Ok(0)
    }

    fn quarantined(&self) -> Result<Vec<QuarantinedRecord>> {
        let list = self.shared.key("quarantine", b"");
        let entries: Vec<Vec<u8>> = self
            .shared
            .pool
            .run(|con| redis::cmd("LRANGE").arg(&list).arg(0).arg(-1).query(con))?;
        Ok(entries
            .iter()
            .filter_map(|e| record::decode_quarantined(e))
            .collect())
    }
}

/// One message a lease holds.
struct LeaseEntry {
    /// Its id as a field.
    f: String,
    /// The commit script's count: recipients of the bulk send F, `*` for
    /// an announcement, or 0 for the user's own record.
    count: String,
    /// Its replace key, or empty.
    key: String,
}

/// Entries of a user's lease hash held under one token.
struct RedisLease {
    shared: Arc<Shared>,
    user: UserId,
    prefix: Vec<u8>,
    token: String,
    entries: Vec<LeaseEntry>,
    messages: Vec<Message>,
    open: bool,
}

impl RedisLease {
    fn release_entries(&mut self) {
        self.open = false;
        let shared = &self.shared;
        let mut call = shared.scripts.release.prepare_invoke();
        call.key(shared.key("q", &self.prefix))
            .key(shared.key("l", &self.prefix))
            .arg(&shared.ns)
            .arg(&self.prefix)
            .arg(&self.token);
        for entry in &self.entries {
            call.arg(&entry.f).arg(&entry.key).arg(&entry.count);
        }
        match shared.pool.run(|con| call.invoke::<u64>(con)) {
            // Back in the queue: an open page of this process may take them
            // now (other processes hear of it through the script's PUBLISH).
            Ok(back) if back > 0 => shared.common.notifier.user(&self.user),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, user = %self.user, "could not release a lease; its messages come back when it times out");
            }
        }
    }
}

impl LeaseState for RedisLease {
    fn messages(&self) -> &[Message] {
        &self.messages
    }

    fn commit(mut self: Box<Self>) -> Result<Vec<Message>> {
        self.open = false;
        let shared = &self.shared;
        let mut call = shared.scripts.commit.prepare_invoke();
        call.key(shared.key("l", &self.prefix))
            .key(shared.key("done", self.token.as_bytes()))
            .arg(&shared.ns)
            .arg(&self.token)
            .arg(&self.prefix);
        for entry in &self.entries {
            call.arg(&entry.f).arg(&entry.count);
        }
        // Retried for a few seconds if need be: a lost reply must not leave
        // the caller without the messages the commit took.
        let committed: i64 = shared.pool.run_patiently(|con| call.invoke(con))?;
        if committed == 1 {
            Ok(std::mem::take(&mut self.messages))
        } else {
            Err(Error::LeaseExpired {
                timeout: shared.common.lease_timeout,
            })
        }
    }

    fn release(mut self: Box<Self>) {
        self.release_entries();
    }
}

impl Drop for RedisLease {
    fn drop(&mut self) {
        if self.open {
            self.release_entries();
        }
    }
}
