//! The in-memory engine: every promise of the others except surviving the
//! handle. One mutex guards everything, which makes each operation atomic
//! and is plenty for tests. A send to many users stores its text once and
//! a reference per recipient; an announcement is copied into a user's
//! queue (under its own id) the first time that user's queue is read.
//! A background thread drops expired messages every
//! [`REAP_EVERY`](super::REAP_EVERY).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::Mutex;

use super::{Common, EmptyLease, Engine, LeaseState, Outgoing, keep_shown};
use crate::message::{BulkSend, MessageId};
use crate::recipients::Recipients;
use crate::record::QuarantinedRecord;
use crate::{Error, Message, Result, UserId};

pub(crate) struct MemoryEngine {
    state: Arc<Mutex<State>>,
    common: Common,
}

#[derive(Default)]
struct State {
    last_id: u64,
    last_lease: u64,
    /// Each user's messages by id (send order); users without any are absent.
    queues: HashMap<UserId, BTreeMap<u64, Entry>>,
    /// Live announcements by id, with the users who have them in their
    /// queue already (or had, and took them).
    announcements: BTreeMap<u64, Announcement>,
}

struct Announcement {
    body: Arc<Outgoing>,
    reached: HashSet<UserId>,
}

struct Entry {
    body: Arc<Outgoing>,
    /// The lease holding it: its number and deadline.
    lease: Option<(u64, Instant)>,
}

impl Entry {
    fn message(&self, id: u64) -> Message {
        self.body.message(id)
    }

    fn is_leased(&self, now: Instant) -> bool {
        self.lease.is_some_and(|(_, deadline)| deadline > now)
    }
}

impl State {
    /// Copies the announcements `user` has not had into their queue.
    fn reach(&mut self, user: &UserId) {
        let mut new = Vec::new();
        for (id, announcement) in &mut self.announcements {
            // Expired ones too, until reaped: unshown, they still replace
            // the user's older messages with their key.
            if announcement.reached.insert(user.clone()) {
                new.push((*id, announcement.body.clone()));
            }
        }
        if !new.is_empty() {
            let queue = self.queues.entry(user.clone()).or_default();
            for (id, body) in new {
                queue.insert(id, Entry { body, lease: None });
            }
        }
    }

    /// Drops expired messages that are not leased, and expired
    /// announcements. A message with a replace key replaced the older ones
    /// with its key when it was sent, so they go with it: an expired keyed
    /// message takes the user's older same-key messages along, and an
    /// expired keyed announcement takes them from every user it had not
    /// reached yet.
    fn reap(&mut self, now_ms: u64) {
        let now = Instant::now();
        let expired: Vec<(u64, Announcement)> = {
            let ids: Vec<u64> = self
                .announcements
                .iter()
                .filter(|(_, a)| a.body.expired(now_ms))
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| self.announcements.remove(&id).map(|a| (id, a)))
                .collect()
        };
        self.queues.retain(|user, queue| {
            let mut gone: Vec<(u64, String)> = expired
                .iter()
                .filter(|(_, a)| !a.reached.contains(user))
                .filter_map(|(id, a)| a.body.replace_key.clone().map(|key| (*id, key)))
                .collect();
            queue.retain(|id, entry| {
                let keep = entry.is_leased(now) || !entry.body.expired(now_ms);
                if !keep && let Some(key) = &entry.body.replace_key {
                    gone.push((*id, key.clone()));
                }
                keep
            });
            queue.retain(|id, entry| {
                entry.is_leased(now)
                    || !entry
                        .body
                        .replace_key
                        .as_ref()
                        .is_some_and(|key| gone.iter().any(|(newer, k)| newer > id && k == key))
            });
            !queue.is_empty()
        });
    }
}

impl MemoryEngine {
    pub(crate) fn new(common: Common) -> MemoryEngine {
        let state = Arc::new(Mutex::new(State::default()));
        start_reaper(Arc::downgrade(&state), common.clone());
        MemoryEngine { state, common }
    }

    /// Queues `message` for each user under one id; returns how many got it.
    fn send_to(&self, users: impl Iterator<Item = UserId>, message: &Outgoing) -> BulkSend {
        let body = Arc::new(message.clone());
        let mut state = self.state.lock();
        let id = state.last_id + 1;
        let mut recipients = 0;
        for user in users {
            let queue = state.queues.entry(user).or_default();
            if queue.contains_key(&id) {
                continue;
            }
            if let Some(key) = &message.replace_key {
                // Replaced: queued messages with the key go (leased ones
                // stay with their lease; see `Draft::replace_key`).
                queue.retain(|_, entry| {
                    entry.lease.is_some() || entry.body.replace_key.as_ref() != Some(key)
                });
            }
            queue.insert(
                id,
                Entry {
                    body: body.clone(),
                    lease: None,
                },
            );
            recipients += 1;
        }
        if recipients == 0 {
            return BulkSend::none();
        }
        state.last_id = id;
        BulkSend {
            id: Some(MessageId(id)),
            recipients,
        }
    }
}

/// Reaps every [`REAP_EVERY`](super::REAP_EVERY) until the engine is dropped.
fn start_reaper(state: Weak<Mutex<State>>, common: Common) {
    let spawned = std::thread::Builder::new()
        .name("async-messages-memory-reaper".into())
        .spawn(move || {
            loop {
                std::thread::sleep(super::REAP_EVERY);
                let Some(state) = state.upgrade() else {
                    return;
                };
                state.lock().reap(common.now_ms());
            }
        });
    if let Err(error) = spawned {
        // Expired messages are still never shown; they are dropped by the
        // reads that meet them instead.
        tracing::warn!(%error, "could not start the in-memory store's reaper thread");
    }
}

impl Engine for MemoryEngine {
    fn describe(&self, f: &mut fmt::DebugStruct<'_, '_>) {
        f.field("engine", &"memory");
    }

    fn path(&self) -> &Path {
        Path::new("")
    }

    fn send(&self, user: &UserId, message: &Outgoing) -> Result<MessageId> {
        let sent = self.send_to(std::iter::once(user.clone()), message);
        sent.id.ok_or_else(|| Error::Storage {
            path: Default::default(),
            source: "the in-memory store did not queue a message".into(),
        })
    }

    fn send_few(
        &self,
        users: &[UserId],
        message: &Outgoing,
        progress: &mut dyn FnMut(u64),
    ) -> Result<BulkSend> {
        let sent = self.send_to(users.iter().cloned(), message);
        progress(sent.recipients);
        Ok(sent)
    }

    fn send_bulk(&self, users: Recipients, message: &Outgoing) -> Result<BulkSend> {
        Ok(self.send_to(users.users(), message))
    }

    fn send_everyone(&self, message: &Outgoing) -> Result<MessageId> {
        let mut state = self.state.lock();
        state.last_id += 1;
        let id = state.last_id;
        state.announcements.insert(
            id,
            Announcement {
                body: Arc::new(message.clone()),
                reached: HashSet::new(),
            },
        );
        Ok(MessageId(id))
    }

    fn drain(&self, user: &UserId) -> Result<Vec<Message>> {
        let now = Instant::now();
        let now_ms = self.common.now_ms();
        let mut state = self.state.lock();
        state.reach(user);
        let Some(queue) = state.queues.get_mut(user) else {
            return Ok(Vec::new());
        };
        let taken: Vec<u64> = queue
            .iter()
            .filter(|(_, entry)| !entry.is_leased(now))
            .map(|(id, _)| *id)
            .collect();
        let messages: Vec<Message> = taken
            .iter()
            .filter_map(|id| queue.remove(id).map(|entry| entry.message(*id)))
            .collect();
        if queue.is_empty() {
            state.queues.remove(user);
        }
        Ok(keep_shown(messages, now_ms))
    }

    fn may_have(&self, user: &UserId) -> bool {
        let state = self.state.lock();
        state.queues.contains_key(user)
            || state
                .announcements
                .values()
                .any(|announcement| !announcement.reached.contains(user))
    }

    fn peek(&self, user: &UserId) -> Result<Vec<Message>> {
        let now_ms = self.common.now_ms();
        let mut state = self.state.lock();
        state.reach(user);
        let messages: Vec<Message> = state.queues.get(user).map_or_else(Vec::new, |queue| {
            queue.iter().map(|(id, entry)| entry.message(*id)).collect()
        });
        Ok(keep_shown(messages, now_ms))
    }

    fn lease(&self, user: &UserId) -> Result<Box<dyn LeaseState>> {
        let now = Instant::now();
        let now_ms = self.common.now_ms();
        let deadline = now + self.common.lease_timeout;
        let mut state = self.state.lock();
        state.reach(user);
        state.last_lease += 1;
        let number = state.last_lease;
        let Some(queue) = state.queues.get_mut(user) else {
            return Ok(Box::new(EmptyLease));
        };
        let mut ids = Vec::new();
        let mut messages = Vec::new();
        for (id, entry) in queue.iter_mut().filter(|(_, e)| !e.is_leased(now)) {
            entry.lease = Some((number, deadline));
            ids.push(*id);
            messages.push(entry.message(*id));
        }
        if ids.is_empty() {
            return Ok(Box::new(EmptyLease));
        }
        // Expired and replaced ones are taken too, unshown: the commit
        // removes them with the rest.
        let messages = keep_shown(messages, now_ms);
        Ok(Box::new(MemoryLease {
            state: self.state.clone(),
            common: self.common.clone(),
            user: user.clone(),
            number,
            deadline,
            ids,
            messages,
            open: true,
        }))
    }

    fn users(&self) -> Result<Vec<UserId>> {
        Ok(self.state.lock().queues.keys().cloned().collect())
    }

    fn bulk_records(&self) -> Result<u64> {
        Ok(0)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64> {
        Ok(0)
    }

    fn quarantined(&self) -> Result<Vec<QuarantinedRecord>> {
        Ok(Vec::new())
    }
}

struct MemoryLease {
    state: Arc<Mutex<State>>,
    common: Common,
    user: UserId,
    number: u64,
    deadline: Instant,
    ids: Vec<u64>,
    messages: Vec<Message>,
    open: bool,
}

impl MemoryLease {
    /// Ends this lease's hold; with `remove`, takes its messages out unless
    /// the deadline has passed (checked under the lock, so that no drain
    /// can have taken them back). Returns whether they were removed.
    fn end(&mut self, mut remove: bool) -> bool {
        self.open = false;
        let mut state = self.state.lock();
        remove &= Instant::now() < self.deadline;
        let Some(queue) = state.queues.get_mut(&self.user) else {
            return remove;
        };
        for id in &self.ids {
            let owned = queue
                .get(id)
                .is_some_and(|entry| entry.lease.is_some_and(|(n, _)| n == self.number));
            if !owned {
                continue;
            }
            if remove {
                queue.remove(id);
            } else if let Some(entry) = queue.get_mut(id) {
                entry.lease = None;
            }
        }
        if !remove {
            // A released message replaced meanwhile by a newer one with its
            // key (queued or leased) stays replaced.
            let newest: HashMap<String, u64> =
                queue
                    .iter()
                    .fold(HashMap::new(), |mut newest, (id, entry)| {
                        if let Some(key) = &entry.body.replace_key {
                            let seen = newest.entry(key.clone()).or_insert(*id);
                            *seen = (*seen).max(*id);
                        }
                        newest
                    });
            for id in &self.ids {
                let replaced = queue.get(id).is_some_and(|entry| {
                    entry.lease.is_none()
                        && entry
                            .body
                            .replace_key
                            .as_ref()
                            .is_some_and(|key| newest.get(key).is_some_and(|n| n > id))
                });
                if replaced {
                    queue.remove(id);
                }
            }
        }
        if queue.is_empty() {
            state.queues.remove(&self.user);
        }
        drop(state);
        if !remove {
            // Back in the queue: an open page may take them now.
            self.common.notifier.user(&self.user);
        }
        remove
    }
}

impl LeaseState for MemoryLease {
    fn messages(&self) -> &[Message] {
        &self.messages
    }

    fn commit(mut self: Box<Self>) -> Result<Vec<Message>> {
        if !self.end(true) {
            return Err(Error::LeaseExpired {
                timeout: self.common.lease_timeout,
            });
        }
        Ok(std::mem::take(&mut self.messages))
    }

    fn release(mut self: Box<Self>) {
        self.end(false);
    }
}

impl Drop for MemoryLease {
    fn drop(&mut self) {
        if self.open {
            self.end(false);
        }
    }
}
