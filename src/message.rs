//! A delivered message.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::Level;

/// Identifies one send. Ids grow in send order and are never reused, also
/// across restarts. Every recipient of one
/// [`message_users`](crate::MessageStore::message_users) call shares its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub(crate) u64);

impl MessageId {
    /// The id as a number.
    #[must_use]
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A message queued for a user, as returned by
/// [`get_messages`](crate::MessageStore::get_messages) and
/// [`peek`](crate::MessageStore::peek).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub(crate) id: MessageId,
    pub(crate) level: Level,
    pub(crate) sent_at_ms: u64,
    pub(crate) expires_at_ms: Option<u64>,
    pub(crate) replace_key: Option<String>,
    pub(crate) text: String,
}

impl Message {
    /// The text, exactly as sent. It is not escaped: escape it before putting it in HTML.
    #[must_use]
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The message's level.
    #[must_use]
    pub fn level(&self) -> Level {
        self.level
    }

    /// When the message was sent (wall clock, millisecond precision).
    #[must_use]
    pub fn sent_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.sent_at_ms)
    }

    /// When the message expires, if it was sent with an expiry (see
    /// [`Draft::expires_after`](crate::Draft::expires_after)).
    #[must_use]
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at_ms
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// The replace key it was sent with, if any (see
    /// [`Draft::replace_key`](crate::Draft::replace_key)).
    #[must_use]
    pub fn replace_key(&self) -> Option<&str> {
        self.replace_key.as_deref()
    }

    /// The id of the send that queued it.
    #[must_use]
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// Takes the text out of the message.
    #[must_use]
    pub fn into_text(self) -> String {
        self.text
    }
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.level, self.text)
    }
}

/// A message to store, already checked against the store's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outgoing {
    pub(crate) text: String,
    pub(crate) level: Level,
    pub(crate) sent_at_ms: u64,
    /// Milliseconds since the Unix epoch (the store's clock); `None` keeps
    /// it until delivered.
    pub(crate) expires_at_ms: Option<u64>,
    /// A newer message with the same key replaces this one in its
    /// recipient's queue.
    pub(crate) replace_key: Option<String>,
}

impl Outgoing {
    /// The message as delivered under `id`.
    pub(crate) fn message(&self, id: u64) -> Message {
        self.clone().into_message(id)
    }

    pub(crate) fn into_message(self, id: u64) -> Message {
        Message {
            id: MessageId(id),
            level: self.level,
            sent_at_ms: self.sent_at_ms,
            expires_at_ms: self.expires_at_ms,
            replace_key: self.replace_key,
            text: self.text,
        }
    }

    /// Whether it has expired at `now_ms`.
    pub(crate) fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }
}

/// The outcome of a [`message_users`](crate::MessageStore::message_users) call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkSend {
    pub(crate) id: Option<MessageId>,
    pub(crate) recipients: u64,
}

impl BulkSend {
    /// Nothing was sent (no recipients, or a level below the minimum).
    pub(crate) fn none() -> BulkSend {
        BulkSend {
            id: None,
            recipients: 0,
        }
    }

    /// The id shared by every recipient's copy, or `None` when nothing was
    /// queued (no users, or the level is below the store's minimum).
    #[must_use]
    pub fn id(&self) -> Option<MessageId> {
        self.id
    }

    /// How many users the message was queued for (a user listed twice
    /// receives it once and counts once).
    #[must_use]
    pub fn recipients(&self) -> u64 {
        self.recipients
    }
}

/// Progress of a bulk send, reported after each chunk is written. See
/// [`message_users_with_progress`](crate::MessageStore::message_users_with_progress).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Progress {
    /// Recipients written so far (not yet visible: the send becomes visible
    /// to all of them at once when it commits).
    pub written: u64,
    /// `true` on the last report, after the send has committed.
    pub committed: bool,
}

/// The system clock in milliseconds since the Unix epoch (for times that
/// are not message times: quarantine entries, tokens).
pub(crate) fn now_ms() -> u64 {
    crate::clock::millis(SystemTime::now())
}
