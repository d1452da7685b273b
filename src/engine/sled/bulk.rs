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
//!
//! An *announcement* (`everyone`) is a bulk record whose set holds the users
//! who took it (folded) instead of those who may: every other user is
//! listed. Folding adds its takers to the set and removes their marks; it
//! is never taken by all, and lives until it expires (or for ever).
//!
//! The same thread reaps: every [`REAP_EVERY`](crate::engine::REAP_EVERY)
//! it runs the engine's reaper (attached once the engine is open), which
//! removes expired records and expired bulk records as a whole. Folds and
//! reaps never run at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

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
    /// Listed users who have taken it (their mark is written) since the
    /// last fold, and whether the reaper has removed the record.
    taken: Mutex<Taken>,
}

#[derive(Debug, Default)]
struct Taken {
    users: Recipients,
    /// Reaped: marks written from now on are removed by their writer.
    dead: bool,
}

impl Bulk {
    pub(crate) fn new(id: u64, message: Outgoing, everyone: bool, recipients: Recipients) -> Bulk {
        Bulk {
            id,
            message,
            everyone,
            // An announcement always has users left (every user not seen yet).
            remaining: AtomicU64::new(if everyone { u64::MAX } else { recipients.len() }),
            recipients: RwLock::new(Arc::new(recipients)),
            taken: Mutex::new(Taken::default()),
        }
    }

    pub(crate) fn recipients(&self) -> Arc<Recipients> {
        self.recipients.read().clone()
    }

    /// Whether the record is for `user`, taken or not (a user's taken
    /// mark says whether they took it since the last fold).
    pub(crate) fn lists(&self, user: &UserId) -> bool {
        // An announcement's set holds the users who took it.
        self.recipients.read().contains(user) != self.everyone
    }

    /// Whether `user` may still get this announcement: not among its takers
    /// (a hint: a taker whose drain is still finishing counts as not yet).
    pub(crate) fn untaken_by(&self, user: &UserId) -> bool {
        !self.recipients.read().contains(user) && !self.taken.lock().users.contains(user)
    }

    /// Records that `user`'s mark is written (by a drain that is durable,
    /// for the store's durability, or found at open). `false` once the
    /// reaper has removed the record: the caller then removes the mark.
    pub(crate) fn note_taken(&self, user: &UserId) -> bool {
        let mut taken = self.taken.lock();
        if taken.dead {
            return false;
        }
        if !self.everyone {
            self.remaining.fetch_sub(1, Ordering::AcqRel);
        }
        taken.users.insert(user);
        true
    }

    /// Whether the reaper has removed it (see [`kill`](Self::kill)).
    pub(crate) fn is_dead(&self) -> bool {
        self.taken.lock().dead
    }

    /// Marks the record removed by the reaper and returns the users whose
    /// marks were noted since the last fold. Later
    /// [`note_taken`](Self::note_taken) calls return `false`.
    pub(crate) fn kill(&self) -> Recipients {
        let mut taken = self.taken.lock();
        taken.dead = true;
        std::mem::take(&mut taken.users)
    }

    /// Whether a fold would pay off: every listed user has taken it, or
    /// many have since the last fold.
    pub(crate) fn due(&self) -> bool {
        let taken = self.taken.lock().users.len();
        if self.everyone {
            return taken >= FOLD_MIN;
        }
        taken > 0
            && (self.remaining() == 0
                || (taken >= FOLD_MIN && taken.saturating_mul(2) >= self.recipients.read().len()))
    }

    pub(crate) fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    /// Takes the users marked since the last fold.
    pub(crate) fn take_marked(&self) -> Recipients {
        std::mem::take(&mut self.taken.lock().users)
    }

    /// Puts back users whose marks a failed fold did not remove.
    pub(crate) fn restore_marked(&self, users: &Recipients) {
        let mut taken = self.taken.lock();
        for user in users.users() {
            taken.users.insert(&user);
        }
    }

    /// Whether it has expired at `now_ms`.
    pub(crate) fn expired(&self, now_ms: u64) -> bool {
        self.message.expired(now_ms)
    }

    pub(crate) fn replace_recipients(&self, recipients: Recipients) {
        *self.recipients.write() = Arc::new(recipients);
    }
}

/// The live bulk records, in sequence order.
#[derive(Debug, Default)]
pub(crate) struct BulkList {
    live: RwLock<Arc<Vec<Arc<Bulk>>>>,
    /// How many of them are announcements (so that the empty-queue fast
    /// path checks them only when there are some).
    announcements: AtomicUsize,
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
        if bulk.everyone {
            self.announcements.fetch_add(1, Ordering::AcqRel);
        }
        next.push(bulk);
        next.sort_by_key(|b| b.id);
        *live = Arc::new(next);
    }

    pub(crate) fn remove(&self, id: u64) {
        let mut live = self.live.write();
        let mut next = Vec::with_capacity(live.len());
        for bulk in live.iter() {
            if bulk.id != id {
                next.push(bulk.clone());
            } else if bulk.everyone {
                self.announcements.fetch_sub(1, Ordering::AcqRel);
            }
        }
        *live = Arc::new(next);
    }

    /// Whether any announcement is live.
    pub(crate) fn has_announcements(&self) -> bool {
        self.announcements.load(Ordering::Acquire) > 0
    }

    pub(crate) fn get(&self, id: u64) -> Option<Arc<Bulk>> {
        self.live.read().iter().find(|b| b.id == id).cloned()
    }
}

/// What the reaper runs: it checks the flag between records and returns
/// early once the store is closing.
pub(crate) type Reaper = Box<dyn FnMut(&AtomicBool) + Send>;

enum Job {
    Fold(u64),
    /// Starts reaping every `REAP_EVERY`.
    Attach(Reaper),
}

/// The store's background thread: folds bulk records (see the module docs)
/// and reaps. Closing the store finishes the folds already asked for, so
/// that the space they free is free when the store is closed, and cuts a
/// reap short. A fold cut short by a crash leaves only marks that are no
/// longer needed, which the next open removes.
pub(crate) struct Maintenance {
    sender: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    stopping: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Maintenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maintenance").finish_non_exhaustive()
    }
}

impl Maintenance {
    pub(crate) fn start(backend: Backend, bulks: Arc<BulkList>) -> Result<Maintenance> {
        let (sender, receiver) = std::sync::mpsc::channel::<Job>();
        let path = backend.path().to_path_buf();
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("async-messages-maintenance".into())
            .spawn(move || {
                let every = crate::engine::REAP_EVERY;
                let mut reaper: Option<Reaper> = None;
                let mut next_reap = Instant::now() + every;
                loop {
                    let wait = next_reap.saturating_duration_since(Instant::now());
                    let mut due = Vec::new();
                    match receiver.recv_timeout(wait) {
                        Ok(job) => {
                            for job in std::iter::once(job).chain(receiver.try_iter()) {
                                match job {
                                    Job::Fold(id) => due.push(id),
                                    Job::Attach(run) => reaper = Some(run),
                                }
                            }
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
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
                    if Instant::now() >= next_reap {
                        if let Some(run) = &mut reaper
                            && !backend.is_poisoned()
                            && !stop.load(Ordering::Acquire)
                        {
                            run(&stop);
                        }
                        next_reap = Instant::now() + every;
                    }
                }
            })
            .map_err(|e| super::backend::io_error(&path, e))?;
        Ok(Maintenance {
            sender: Mutex::new(Some(sender)),
            stopping,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Asks for bulk record `id` to be folded.
    pub(crate) fn fold(&self, id: u64) {
        if let Some(sender) = &*self.sender.lock() {
            // Only fails once the thread has stopped: the store is closing.
            let _ = sender.send(Job::Fold(id));
        }
    }

    /// Runs `reaper` every [`REAP_EVERY`](crate::engine::REAP_EVERY) from
    /// now on, on this thread.
    pub(crate) fn attach(&self, reaper: Reaper) {
        if let Some(sender) = &*self.sender.lock() {
            let _ = sender.send(Job::Attach(reaper));
        }
    }

    /// Finishes the folds asked for, then stops the thread.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
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
    let left = if bulk.everyone {
        // An announcement's set holds its takers: they join it.
        union(&bulk.recipients(), &marked)
    } else {
        bulk.recipients().without(&marked)
    };
    let rewritten = if left.is_empty() && !bulk.everyone {
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

/// The users in `a` or in `b`.
fn union(a: &Recipients, b: &Recipients) -> Recipients {
    let mut strs: Vec<String> = a.strs.iter().chain(&b.strs).cloned().collect();
    strs.sort_unstable();
    strs.dedup();
    Recipients {
        ints: &a.ints | &b.ints,
        strs,
    }
}
