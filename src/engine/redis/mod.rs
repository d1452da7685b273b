//! The Redis engine: one store shared by every process that opens the same
//! server and namespace. Each change is one Lua script (see `scripts.rs`
//! for the keys and why scripts); this file turns the API into script
//! calls and keeps a small connection pool and a cache of bulk sends.
//!
//! A drain is a lease and its commit, two scripts: if the connection breaks
//! after the first, the messages come back when the lease times out instead
//! of being lost; a commit whose reply was lost is retried, and the retry
//! sees the `done` mark of the first try.

mod pool;
mod scripts;

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use redis::{Script, Value};

use self::pool::Pool;
use super::{Common, EmptyLease, Engine, LeaseState, Outgoing};
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
}

/// The cached bulk sends that list one user, with their ids as fields.
type Candidates = Vec<(String, Arc<CachedBulk>)>;

struct CachedBulk {
    message: Outgoing,
    everyone: bool,
    recipients: Recipients,
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
                send: Script::new(scripts::SEND),
                bulk: Script::new(scripts::BULK),
                lease: Script::new(&scripts::lease()),
                commit: Script::new(&scripts::commit()),
                release: Script::new(scripts::RELEASE),
                peek: Script::new(&scripts::peek()),
                any: Script::new(&scripts::any()),
                quarantine: Script::new(scripts::QUARANTINE),
            },
            bulks: Mutex::new(BulkCache::default()),
            tokens: Tokens::new(),
        };
        // Fails now, with the URL, if the server cannot be reached.
        shared.pool.run(|con| redis::cmd("PING").query::<()>(con))?;
        Ok(RedisEngine {
            shared: Arc::new(shared),
        })
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

    /// Runs `call` with the bulk sends that list `user`, refreshing the
    /// cache and trying again while the script answers `stale`.
    fn with_candidates<T>(
        &self,
        user: &UserId,
        mut call: impl FnMut(&str, &str, &[(String, Arc<CachedBulk>)]) -> Result<Option<T>>,
    ) -> Result<T> {
        loop {
            let (known, epoch, candidates) = {
                let cache = self.bulks.lock();
                let candidates: Vec<(String, Arc<CachedBulk>)> = cache
                    .bulks
                    .iter()
                    .filter(|(_, bulk)| bulk.recipients.contains(user))
                    .map(|(id, bulk)| (field(*id), bulk.clone()))
                    .collect();
                (format!("({}", cache.known), cache.epoch.clone(), candidates)
            };
            if let Some(done) = call(&known, &epoch, &candidates)? {
                return Ok(done);
            }
            self.refresh_bulks()?;
        }
    }

    /// Runs one of the scripts that read a user's queue (lease, peek, any):
    /// KEYS q, l, bulks; ARGV ns, u, `extra`, '(' ‖ the newest bulk id in
    /// the cache, the cache's epoch, then the cached bulk sends that list
    /// the user. Refreshes
    /// the cache and runs it again while the script answers `stale`.
    fn run_for_user(
        &self,
        script: &Script,
        user: &UserId,
        u: &[u8],
        extra: &[&str],
    ) -> Result<(Value, Candidates)> {
        let (q, l, bulks) = (self.key("q", u), self.key("l", u), self.key("bulks", b""));
        self.with_candidates(user, |known, epoch, candidates| {
            let mut call = script.prepare_invoke();
            call.key(&q).key(&l).key(&bulks).arg(&self.ns).arg(u);
            for arg in extra {
                call.arg(*arg);
            }
            call.arg(known).arg(epoch);
            for (f, _) in candidates {
                call.arg(f);
            }
            let reply: Value = self.pool.run(|con| call.invoke(con))?;
            Ok((!is_stale(&reply)).then(|| (reply, candidates.to_vec())))
        })
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
        let live: Vec<(String, f64)> = self.pool.run(|con| {
            redis::cmd("ZRANGE")
                .arg(&bulks_key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query(con)
        })?;
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
        // an older one missing from it has been taken by everyone.
        let newest = ids.iter().copied().max().unwrap_or(0);
        let live: std::collections::HashSet<u64> = ids.into_iter().collect();
        cache
            .bulks
            .retain(|id, _| *id > newest || live.contains(id));
        cache.bulks.extend(fetched);
        cache.known = cache.known.max(newest);
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
        let (reply, candidates) =
            self.run_for_user(&self.scripts.lease, user, &u, &[&token, &timeout_ms])?;
        let (own, taken) = match reply {
            Value::Array(mut parts) if parts.len() == 2 => {
                let taken = parts.pop().unwrap_or_default();
                let own = parts.pop().unwrap_or_default();
                (pairs(own), strings(taken))
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
                    lease.entries.push((field(id), 0));
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
            let Some((_, bulk)) = candidates.iter().find(|(c, _)| *c == f) else {
                continue;
            };
            let id = parse_field(f.as_bytes()).unwrap_or_default();
            lease.entries.push((f, bulk.recipients.len()));
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
        Ok(Some(lease))
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
        let shared = &self.shared;
        let value = record::encode_inline(message);
        let mut call = shared.scripts.send.prepare_invoke();
        call.key(shared.key("id", b""))
            .key(shared.key("sent", shared.tokens.next().as_bytes()));
        for user in users {
            call.key(shared.key("q", &key::user_prefix(user)?));
        }
        call.arg(value);
        let (id, recipients): (u64, u64) = shared.pool.run(|con| call.invoke(con))?;
        progress(recipients);
        Ok(BulkSend {
            id: Some(MessageId(id)),
            recipients,
        })
    }

    fn send_bulk(&self, users: Recipients, message: &Outgoing) -> Result<BulkSend> {
        let shared = &self.shared;
        let value = record::encode_bulk(message, false, &users);
        let (id_key, bulks) = (shared.key("id", b""), shared.key("bulks", b""));
        let sent = shared.key("sent", shared.tokens.next().as_bytes());
        let id: u64 = shared.pool.run(|con| {
            shared
                .scripts
                .bulk
                .key(&id_key)
                .key(&bulks)
                .key(&sent)
                .arg(&shared.ns)
                .arg(&value)
                .invoke(con)
        })?;
        let recipients = users.len();
        // This process knows the record already: no fetch on its next read
        // (`known` stays, so bulk sends committed in between are still fetched).
        shared.bulks.lock().bulks.insert(
            id,
            Arc::new(CachedBulk {
                message: message.clone(),
                everyone: false,
                recipients: users,
            }),
        );
        Ok(BulkSend {
            id: Some(MessageId(id)),
            recipients,
        })
    }

    fn send_everyone(&self, _message: &Outgoing) -> Result<MessageId> {
        Err(self.shared.unexpected(&Value::Nil))
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

    fn peek(&self, user: &UserId) -> Result<Vec<Message>> {
        let shared = &self.shared;
        let u = key::user_prefix(user)?;
        let (q, l) = (shared.key("q", &u), shared.key("l", &u));
        let (reply, candidates) = shared.run_for_user(&shared.scripts.peek, user, &u, &[])?;
        let Value::Array(parts) = reply else {
            return Err(shared.unexpected(&reply));
        };
        let mut parts = parts.into_iter();
        let (queued, leased, untaken) = (
            pairs(parts.next().unwrap_or_default()),
            pairs(parts.next().unwrap_or_default()),
            strings(parts.next().unwrap_or_default()),
        );
        let bulk_message = |f: &str| {
            let id = parse_field(f.as_bytes())?;
            let bulk = candidates
                .iter()
                .find(|(c, _)| c == f)
                .map(|(_, bulk)| bulk.clone())
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
        Ok(messages)
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

/// Entries of a user's lease hash held under one token.
struct RedisLease {
    shared: Arc<Shared>,
    user: UserId,
    prefix: Vec<u8>,
    token: String,
    /// (F, recipients of the bulk send F, or 0 for the user's own record).
    entries: Vec<(String, u64)>,
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
        for (f, _) in &self.entries {
            call.arg(f);
        }
        if let Err(error) = shared.pool.run(|con| call.invoke::<()>(con)) {
            tracing::warn!(%error, user = %self.user, "could not release a lease; its messages come back when it times out");
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
            .arg(&self.token);
        for (f, recipients) in &self.entries {
            call.arg(f).arg(recipients.to_string());
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
