//! The in-memory engine: every promise of the others except surviving the
//! handle. One mutex guards everything, which makes each operation atomic
//! and is plenty for tests. A send to many users stores its text once and
//! a reference per recipient.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::{Common, EmptyLease, Engine, LeaseState, Outgoing};
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
}

struct Entry {
    body: Arc<Outgoing>,
    /// The lease holding it: its number and deadline.
    lease: Option<(u64, Instant)>,
}

impl Entry {
    fn message(&self, id: u64) -> Message {
        Message {
            id: MessageId(id),
            level: self.body.level,
            sent_at_ms: self.body.sent_at_ms,
            text: self.body.text.clone(),
        }
    }

    fn is_leased(&self, now: Instant) -> bool {
        self.lease.is_some_and(|(_, deadline)| deadline > now)
    }
}

impl MemoryEngine {
    pub(crate) fn new(common: Common) -> MemoryEngine {
        MemoryEngine {
            state: Arc::new(Mutex::new(State::default())),
            common,
        }
    }

    /// Queues `message` for each user under one id; returns how many got it.
    fn send_to(&self, users: impl Iterator<Item = UserId>, message: &Outgoing) -> BulkSend {
        let body = Arc::new(message.clone());
        let mut state = self.state.lock();
        let id = state.last_id + 1;
        let mut recipients = 0;
        for user in users {
            let queue = state.queues.entry(user).or_default();
            if let std::collections::btree_map::Entry::Vacant(slot) = queue.entry(id) {
                slot.insert(Entry {
                    body: body.clone(),
                    lease: None,
                });
                recipients += 1;
            }
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

    fn drain(&self, user: &UserId) -> Result<Vec<Message>> {
        let now = Instant::now();
        let mut state = self.state.lock();
        let Some(queue) = state.queues.get_mut(user) else {
            return Ok(Vec::new());
        };
        let taken: Vec<u64> = queue
            .iter()
            .filter(|(_, entry)| !entry.is_leased(now))
            .map(|(id, _)| *id)
            .collect();
        let messages = taken
            .iter()
            .filter_map(|id| queue.remove(id).map(|entry| entry.message(*id)))
            .collect();
        if queue.is_empty() {
            state.queues.remove(user);
        }
        Ok(messages)
    }

    fn may_have(&self, user: &UserId) -> bool {
        self.state.lock().queues.contains_key(user)
    }

    fn peek(&self, user: &UserId) -> Result<Vec<Message>> {
        let state = self.state.lock();
        Ok(state.queues.get(user).map_or_else(Vec::new, |queue| {
            queue.iter().map(|(id, entry)| entry.message(*id)).collect()
        }))
    }

    fn lease(&self, user: &UserId) -> Result<Box<dyn LeaseState>> {
        let now = Instant::now();
        let deadline = now + self.common.lease_timeout;
        let mut state = self.state.lock();
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
        Ok(Box::new(MemoryLease {
            state: self.state.clone(),
            common: self.common,
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
        if queue.is_empty() {
            state.queues.remove(&self.user);
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
