//! Wake-ups for open pages: a store tells the code waiting on a user's
//! queue that something may have arrived.
//!
//! Waiters are grouped into buckets by a hash of the user, so a wake-up
//! costs one hash and wakes only the waiters of that bucket (usually just
//! the user's), who then read their queue: a wake-up is a hint, never a
//! message. Engines call [`Notifier::user`] after a send is durable and
//! visible, and [`Notifier::everyone`] after a bulk send or an
//! announcement; the Redis engine also relays other processes' sends
//! through Redis pub/sub.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use event_listener::{Event, EventListener, Listener};

use crate::{UserId, key};

const BUCKETS: usize = 256;

/// The buckets of waiters; one per store (shared by its engine).
pub(crate) struct Notifier {
    buckets: Box<[Event]>,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier").finish_non_exhaustive()
    }
}

impl Default for Notifier {
    fn default() -> Self {
        Notifier {
            buckets: (0..BUCKETS).map(|_| Event::new()).collect(),
        }
    }
}

impl Notifier {
    fn bucket_of(prefix: &[u8]) -> usize {
        usize::try_from(key::prefix_hash(prefix) % BUCKETS as u64).unwrap_or(0)
    }

    /// Wakes the waiters of the user whose key prefix is `prefix`.
    pub(crate) fn prefix(&self, prefix: &[u8]) {
        self.buckets[Notifier::bucket_of(prefix)].notify(usize::MAX);
    }

    /// Wakes `user`'s waiters.
    pub(crate) fn user(&self, user: &UserId) {
        if let Ok(prefix) = key::user_prefix(user) {
            self.prefix(&prefix);
        }
    }

    /// Wakes every waiter (a bulk send, an announcement, a reconnect).
    pub(crate) fn everyone(&self) {
        for bucket in &*self.buckets {
            bucket.notify(usize::MAX);
        }
    }
}

/// Waits for news of one user's queue; made by
/// [`MessageStore::watch`](crate::MessageStore::watch).
///
/// A wake-up means "something may have arrived": read the queue (with
/// [`lease_messages`](crate::MessageStore::lease_messages) or
/// [`get_messages`](crate::MessageStore::get_messages)) and wait again.
/// Make the `Watch` *before* the first read, so that a message sent between
/// the read and the wait still wakes it:
///
/// ```
/// # use async_messages::MessageStore;
/// # use std::time::Duration;
/// let store = MessageStore::in_memory();
/// let mut watch = store.watch(7_u64)?;
/// let sender = store.clone();
/// std::thread::spawn(move || sender.info(7_u64, "Your report is ready"));
/// let mut shown = Vec::new();
/// while shown.is_empty() {
///     shown = store.get_messages(7_u64)?;
///     if shown.is_empty() {
///         watch.wait_timeout(Duration::from_secs(5));
///     }
/// }
/// assert_eq!(shown[0].text(), "Your report is ready");
/// # Ok::<(), async_messages::Error>(())
/// ```
///
/// Wake-ups can be spurious (another user in the same bucket, a bulk send
/// to others); they are never lost while the `Watch` lives.
pub struct Watch {
    notifier: Arc<Notifier>,
    bucket: usize,
    listener: EventListener,
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl Watch {
    pub(crate) fn new(notifier: Arc<Notifier>, prefix: &[u8]) -> Watch {
        let bucket = Notifier::bucket_of(prefix);
        let listener = notifier.buckets[bucket].listen();
        Watch {
            notifier,
            bucket,
            listener,
        }
    }

    /// A fresh listener in place of the one that fired.
    fn rearm(&mut self) {
        self.listener = self.notifier.buckets[self.bucket].listen();
    }

    /// Blocks until a wake-up or until `timeout` has passed; `true` on a
    /// wake-up. Either way, read the queue next.
    pub fn wait_timeout(&mut self, timeout: Duration) -> bool {
        let woken = {
            let listener = &mut self.listener;
            // `wait_timeout` consumes a listener; a fresh one replaces it below.
            let taken = std::mem::replace(listener, self.notifier.buckets[self.bucket].listen());
            taken.wait_timeout(timeout).is_some()
        };
        if woken {
            // The listener made while waiting may already hold this very
            // wake-up; a fresh one after reading is what the caller needs.
            self.rearm();
        }
        woken
    }

    /// Waits until a wake-up (async, for any executor). Then read the queue.
    pub async fn changed(&mut self) {
        (&mut self.listener).await;
        self.rearm();
    }
}
