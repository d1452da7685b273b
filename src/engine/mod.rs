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
use std::time::Duration;

use crate::message::{BulkSend, MessageId};
use crate::recipients::Recipients;
use crate::record::QuarantinedRecord;
use crate::{Level, Message, Result, UserId};

pub(crate) mod memory;
#[cfg(feature = "redis")]
pub(crate) mod redis;
pub(crate) mod sled;

/// A message to store, already checked against the store's rules.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub(crate) text: String,
    pub(crate) level: Level,
    pub(crate) sent_at_ms: u64,
}

/// Settings every engine takes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Common {
    /// How long a lease may stay uncommitted before its messages return.
    pub(crate) lease_timeout: Duration,
    /// The store's rules, for messages that reach an engine without going
    /// through `MessageStore` (spooled ones).
    pub(crate) rules: Rules,
}

/// The rules every engine shares, checked before a send reaches it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    pub(crate) min_level: Level,
    pub(crate) max_message_bytes: usize,
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

    /// Returns the user's queued, unleased messages in send order and
    /// removes them, atomically.
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
