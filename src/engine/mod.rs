//! The seam between the public API and the engines that keep the messages.
//!
//! [`MessageStore`](crate::MessageStore) (in `store.rs`) owns the rules every
//! engine shares: the minimum level, the size limit, the checks of user ids,
//! and the split between a send to a few users and a bulk send. It then hands
//! an [`Outgoing`] message to one [`Engine`]:
//!
//! - `sled/`: the embedded default, one process, on disk;
//! - `redis/` (feature `redis`): several processes and servers sharing one
//!   Redis server;
//! - `memory.rs`: in memory, for users' own tests and as a reference.
//!
//! Every engine keeps the same promises, checked by the same tests (each
//! behavioural test is defined once and run on every engine through
//! `engine_tests!` in `tests/common/engines.rs`; `tests/conformance.rs`
//! adds the seam's own): a drain returns
//! each message to exactly one caller, in send order per user; a bulk send
//! is all or nothing and stored once; leased messages are hidden until the
//! lease is committed, and come back in their original place when it is
//! released, dropped, or held past the lease timeout.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::live::Notifier;
pub(crate) use crate::message::Outgoing;
use crate::message::{BulkSend, MessageId};
use crate::recipients::Recipients;
use crate::record::QuarantinedRecord;
use crate::{Level, Message, Result, UserId};

pub(crate) mod memory;
#[cfg(feature = "redis")]
pub(crate) mod redis;
pub(crate) mod sled;

/// Which of a user's messages, in send order, are still to be shown at
/// `now_ms`: those not expired and not replaced by a later one with the
/// same replace key (a later one replaces an earlier one even once it has
/// expired itself). Every engine filters its reads through this, so that
/// they agree; a drain or a lease's commit removes the others unshown.
pub(crate) fn shown(messages: &[Message], now_ms: u64) -> Vec<bool> {
    let mut shown = vec![true; messages.len()];
    let mut keys: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for (i, message) in messages.iter().enumerate().rev() {
        if let Some(key) = message.replace_key.as_deref()
            && !keys.insert(key)
        {
            shown[i] = false;
        }
        if message.expires_at_ms.is_some_and(|at| at <= now_ms) {
            shown[i] = false;
        }
    }
    shown
}

/// How often engines drop expired messages in the background (reads never
/// show them, whenever they are dropped).
pub(crate) const REAP_EVERY: Duration = Duration::from_secs(1);

/// The messages [`shown`] keeps, in their order.
pub(crate) fn keep_shown(messages: Vec<Message>, now_ms: u64) -> Vec<Message> {
    let keep = shown(&messages, now_ms);
    messages
        .into_iter()
        .zip(keep)
        .filter_map(|(message, keep)| keep.then_some(message))
        .collect()
}

/// Settings every engine takes.
#[derive(Debug, Clone)]
pub(crate) struct Common {
    /// How long a lease may stay uncommitted before its messages return.
    pub(crate) lease_timeout: Duration,
    /// The store's rules, for messages that reach an engine without going
    /// through `MessageStore` (spooled ones).
    pub(crate) rules: Rules,
    /// The wall clock for expiry and send times.
    pub(crate) clock: Arc<dyn Clock>,
    /// Wakes the store's watchers (live delivery).
    pub(crate) notifier: Arc<Notifier>,
}

impl Common {
    /// The clock's time in milliseconds since the Unix epoch.
    pub(crate) fn now_ms(&self) -> u64 {
        crate::clock::now_ms(&*self.clock)
    }
}

/// The rules every engine shares, checked before a send reaches it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    pub(crate) min_level: Level,
    pub(crate) max_message_bytes: usize,
    /// The expiry of sends that do not choose one.
    pub(crate) default_expiry: Option<Duration>,
}

impl Rules {
    /// [`Error::EmptyMessage`](crate::Error::EmptyMessage) or
    /// [`Error::MessageTooLarge`](crate::Error::MessageTooLarge) for a text
    /// these rules refuse.
    pub(crate) fn check_text(&self, text: &str) -> Result<()> {
        if text.is_empty() {
            return Err(crate::Error::EmptyMessage);
        }
        if text.len() > self.max_message_bytes {
            return Err(crate::Error::MessageTooLarge {
                size: text.len(),
                limit: self.max_message_bytes,
            });
        }
        Ok(())
    }
}

impl Default for Rules {
    /// The defaults of `MessageStore::builder()`.
    fn default() -> Rules {
        Rules {
            min_level: Level::Info,
            max_message_bytes: crate::MessageStore::DEFAULT_MAX_MESSAGE_BYTES,
            default_expiry: None,
        }
    }
}

/// One way of keeping the messages. Inputs are checked before they get
/// here: texts are within the limit, string ids within theirs, and the
/// level is at least the store's minimum.
pub(crate) trait Engine: Send + Sync + 'static {
    /// Writes the engine's fields for `MessageStore`'s `Debug`.
    fn describe(&self, f: &mut fmt::DebugStruct<'_, '_>);

    /// The store's directory; empty for engines without one.
    fn path(&self) -> &Path;

    /// Queues a message for one user.
    fn send(&self, user: &UserId, message: &Outgoing) -> Result<MessageId>;

    /// Queues a message for up to [`THRESHOLD`](crate::recipients::THRESHOLD)
    /// users, all or nothing. A user listed twice gets one copy. Calls
    /// `progress(written)` as recipients are written.
    fn send_few(
        &self,
        users: &[UserId],
        message: &Outgoing,
        progress: &mut dyn FnMut(u64),
    ) -> Result<BulkSend>;

    /// Queues a message for a large set of users, stored once, all or nothing.
    fn send_bulk(&self, users: Recipients, message: &Outgoing) -> Result<BulkSend>;

    /// Queues an announcement: one record that every user who reads their
    /// queue before it expires takes once, users never seen before
    /// included, in send order with their other messages.
    fn send_everyone(&self, message: &Outgoing) -> Result<MessageId>;

    /// Makes sure that sends by other processes wake this process's
    /// watchers (Redis: subscribes to the store's channel). Called when the
    /// first [`Watch`](crate::Watch) is made.
    fn start_live(&self) -> Result<()> {
        Ok(())
    }

    /// Returns the user's queued, unleased messages in send order and
    /// removes them, atomically. Expired and replaced messages (see
    /// [`shown`]) are removed too, without being returned; the same holds
    /// for `peek` (not returned) and `lease` (taken, not returned, and
    /// removed by the commit).
    fn drain(&self, user: &UserId) -> Result<Vec<Message>>;

    /// `false` only when the user certainly has nothing queued.
    fn may_have(&self, user: &UserId) -> bool;

    /// Whether [`may_have`](Self::may_have) is answered from memory, without
    /// waiting (false for an engine across the network).
    fn may_have_is_local(&self) -> bool {
        true
    }

    /// The user's queued messages in send order, leased ones included.
    fn peek(&self, user: &UserId) -> Result<Vec<Message>>;

    /// Hides the user's queued, unleased messages until the lease ends.
    fn lease(&self, user: &UserId) -> Result<Box<dyn LeaseState>>;

    /// Every user who may have messages queued (a superset: users whose
    /// queue turns out empty are allowed), in no particular order.
    fn users(&self) -> Result<Vec<UserId>>;

    /// How many large bulk sends are stored as one record each.
    fn bulk_records(&self) -> Result<u64>;

    /// Makes every write so far durable.
    fn flush(&self) -> Result<()>;

    /// Bytes on disk.
    fn size_on_disk(&self) -> Result<u64>;

    /// Records moved aside because they could not be decoded.
    fn quarantined(&self) -> Result<Vec<QuarantinedRecord>>;
}

/// An engine's side of a [`Lease`](crate::Lease).
pub(crate) trait LeaseState: Send + Sync {
    /// The leased messages, in send order.
    fn messages(&self) -> &[Message];

    /// Removes the messages for good; [`Error::LeaseExpired`](crate::Error::LeaseExpired)
    /// (and nothing removed) once the lease timeout has passed.
    fn commit(self: Box<Self>) -> Result<Vec<Message>>;

    /// Puts the messages back in their place in the queue.
    fn release(self: Box<Self>);
}

/// A lease that holds nothing (the user's queue was empty).
pub(crate) struct EmptyLease;

impl LeaseState for EmptyLease {
    fn messages(&self) -> &[Message] {
        &[]
    }

    fn commit(self: Box<Self>) -> Result<Vec<Message>> {
        Ok(Vec::new())
    }

    fn release(self: Box<Self>) {}
}
