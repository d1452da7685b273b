//! Bulk sends stored once: fan-out on read.
//!
//! A send to more than [`THRESHOLD`] users stores one record in the `bulk`
//! tree: level, send time, text and the recipient set (integer ids as a
//! roaring bitmap, string ids sorted). Nothing is written per recipient.
//! A user's drain delivers every live bulk record that lists the user and
//! that the user has not taken yet, merged with the user's own records by
//! sequence number, and writes a *taken mark* (`user ‖ bulk id` in the
//! `messages` tree) that commits the drain: it lists the user's records the
//! drain removes, is written before them, and recovery finishes removals a
//! crash cut off (see `Inner::remove` in `store.rs`).
//!
//! Space comes back by *folding*: once many recipients have taken a record,
//! the maintenance thread rewrites it without them and then removes their
//! marks (after a flush, so a crash can only leave marks that are no longer
//! needed, which the next open removes). When every recipient has taken it,
//! the record and its marks are removed.
//!
//! Bulk records get their sequence number when they commit, under one lock,
//! so the in-memory list of live records is in sequence order and a drain
//! that read it has seen every bulk send that committed before.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use super::backend::Backend;
use crate::engine::Outgoing;
use crate::recipients::Recipients;
use crate::{Result, UserId};

/// Fold a record once this many recipients have taken it since the last fold
/// (and at least half of those still listed), or when all have.
const FOLD_MIN: u64 = 4096;

/// One live bulk record.
#[derive(Debug)]
pub(crate) struct Bulk {
    pub(crate) id: u64,
    pub(crate) message: Outgoing,
    /// An announcement: `recipients` are the users who took it (folded),
    /// and every other user is listed.
    pub(crate) everyone: bool,
    /// Users still listed in the stored record (swapped by a fold).
    recipients: RwLock<Arc<Recipients>>,
    /// Listed users who have not taken it.
    remaining: AtomicU64,
    /// Listed users who have taken it (their mark is written) since the last fold.
    taken: Mutex<Recipients>,
}

impl Bulk {
    pub(crate) fn new(id: u64, message: Outgoing, everyone: bool, recipients: Recipients) -> Bulk {
        Bulk {
            id,
            message,
            everyone,
            remaining: AtomicU64::new(recipients.len()),
            recipients: RwLock::new(Arc::new(recipients)),
            taken: Mutex::new(Recipients::default()),
        }
    }

    pub(crate) fn recipients(&self) -> Arc<Recipients> {
        self.recipients.read().clone()
    }

    pub(crate) fn lists(&self, user: &UserId) -> bool {
        self.recipients.read().contains(user)
    }

    /// Records that `user`'s mark is written (by a drain that is durable,
    /// for the store's durability, or found at open).
    pub(crate) fn note_taken(&self, user: &UserId) {
        self.remaining.fetch_sub(1, Ordering::AcqRel);
        self.taken.lock().insert(user);
    }

    /// Whether a fold would pay off: every listed user has taken it, or
    /// many have since the last fold.
    pub(crate) fn due(&self) -> bool {
        let taken = self.taken.lock().len();
        taken > 0
            && (self.remaining() == 0
                || (taken >= FOLD_MIN && taken.saturating_mul(2) >= self.recipients.read().len()))
    }

    pub(crate) fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    /// Takes the users marked since the last fold.
    pub(crate) fn take_marked(&self) -> Recipients {
        std::mem::take(&mut *self.taken.lock())
    }

    /// Puts back users whose marks a failed fold did not remove.
    pub(crate) fn restore_marked(&self, users: &Recipients) {
        let mut taken = self.taken.lock();
        for user in users.users() {
            taken.insert(&user);
        }
    }

    pub(crate) fn replace_recipients(&self, recipients: Recipients) {
        *self.recipients.write() = Arc::new(recipients);
    }
}

/// The live bulk records, in sequence order.
#[derive(Debug, Default)]
pub(crate) struct BulkList {
    live: RwLock<Arc<Vec<Arc<Bulk>>>>,
    /// Held while a bulk send takes its sequence number and becomes visible.
    pub(crate) commit: Mutex<()>,
}

impl BulkList {
    /// The live records now (cheap: one `Arc` clone).
    pub(crate) fn snapshot(&self) -> Arc<Vec<Arc<Bulk>>> {
        self.live.read().clone()
    }

    /// Appends a record; its id must be greater than every live one's.
    pub(crate) fn push(&self, bulk: Arc<Bulk>) {
        let mut live = self.live.write();
        let mut next = Vec::with_capacity(live.len() + 1);
        next.extend(live.iter().cloned());
        next.push(bulk);
        next.sort_by_key(|b| b.id);
        *live = Arc::new(next);
    }

    pub(crate) fn remove(&self, id: u64) {
        let mut live = self.live.write();
        let next: Vec<_> = live.iter().filter(|b| b.id != id).cloned().collect();
        *live = Arc::new(next);
    }

    pub(crate) fn get(&self, id: u64) -> Option<Arc<Bulk>> {
        self.live.read().iter().find(|b| b.id == id).cloned()
    }
}

/// The store's background thread: folds bulk records (see the module docs).
/// Closing the store finishes the folds already asked for, so that the space
/// they free is free when the store is closed. A fold cut short by a crash
/// leaves only marks that are no longer needed, which the next open removes.
pub(crate) struct Maintenance {
    sender: Mutex<Option<std::sync::mpsc::Sender<u64>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Maintenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maintenance").finish_non_exhaustive()
    }
}

impl Maintenance {
    pub(crate) fn start(backend: Backend, bulks: Arc<BulkList>) -> Result<Maintenance> {
        let (sender, receiver) = std::sync::mpsc::channel::<u64>();
        let path = backend.path().to_path_buf();
        let thread = std::thread::Builder::new()
            .name("async-messages-maintenance".into())
            .spawn(move || {
                while let Ok(first) = receiver.recv() {
                    let mut due = vec![first];
                    due.extend(receiver.try_iter());
                    due.sort_unstable();
                    due.dedup();
                    for id in due {
                        if backend.is_poisoned() {
                            return;
                        }
                        if let Err(error) = fold(&backend, &bulks, id) {
                            tracing::warn!(%error, id, "could not fold a bulk record; it is retried later");
                        }
                    }
                }
            })
            .map_err(|e| super::backend::io_error(&path, e))?;
        Ok(Maintenance {
            sender: Mutex::new(Some(sender)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Asks for bulk record `id` to be folded.
    pub(crate) fn fold(&self, id: u64) {
        if let Some(sender) = &*self.sender.lock() {
            // Only fails once the thread has stopped: the store is closing.
            let _ = sender.send(id);
        }
    }

    /// Finishes the folds asked for, then stops the thread.
    pub(crate) fn stop(&self) {
        self.sender.lock().take();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

/// Rewrites bulk record `id` without the users who have taken it (or
/// removes it once all have), then removes their marks.
fn fold(backend: &Backend, bulks: &BulkList, id: u64) -> Result<()> {
    let Some(bulk) = bulks.get(id) else {
        return Ok(());
    };
    let marked = bulk.take_marked();
    if marked.is_empty() {
        return Ok(());
    }
    let left = bulk.recipients().without(&marked);
    let rewritten = if left.is_empty() {
        bulks.remove(id);
        backend.remove_bulk(id)
    } else {
        let value = crate::record::encode_bulk(&bulk.message, bulk.everyone, &left);
        backend
            .insert_bulk(id, &value)
            .map(|()| bulk.replace_recipients(left))
    }
    // The smaller record must be on disk before any mark goes: a crash
    // must never bring back a listed user without its mark.
    .and_then(|()| backend.flush());
    if let Err(error) = rewritten {
        bulk.restore_marked(&marked);
        return Err(error);
    }
    for user in marked.users() {
        let prefix = crate::key::user_prefix(&user)?;
        backend.remove_message(&crate::key::message_key(&prefix, id))?;
    }
    Ok(())
}
