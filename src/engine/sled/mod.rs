//! The sled engine: the embedded default. One process opens the store's
//! directory; every other rule is in the crate docs' `# Design` section.
//!
//! - `backend.rs` is the only file that touches sled (its trees, flushes,
//!   the clean-close mark);
//! - `bulk.rs` keeps large bulk sends as one record each;
//! - `commit.rs` shares one fsync between concurrent writers;
//! - `index.rs` answers "does this user have messages?" from memory.
//!
//! Expiry and replace keys: reads apply [`shown`](super::shown) to the
//! user's merged queue; a drain (or a lease's commit) removes the messages
//! it does not show with the rest. Records that expire have an entry in the
//! `expiry` tree (`expires_at_ms ‖ key`), which the reaper (on the
//! maintenance thread, every [`REAP_EVERY`](super::REAP_EVERY)) reads up to
//! the present, removing what is due without anyone reading; expired bulk
//! records and announcements go as a whole (see `Inner::reap_bulks` for how
//! the index stays exact), and after a reap the reaper helps sled give the
//! disk space back (`Inner::settle`).
//!
//! A replaced message never comes back. A keyed send removes the
//! recipient's older unleased records with its key once it is durable (the
//! new record comes first, so a crash in between leaves an old record that
//! [`shown`](super::shown) hides) and takes their older copies of keyed
//! bulk sends and announcements (a taken mark, undelivered). A keyed bulk
//! send or announcement is only applied at read, and, when it is reaped,
//! to every user who had not taken it. A released message that a newer one
//! replaced meanwhile goes at the release.
//!
//! Announcements are bulk records for everyone (their set lists who took
//! them); they are not in the index, so the empty-queue fast path also
//! checks the live announcements in memory.

mod backend;
mod bulk;
mod commit;
mod index;
mod intake;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[cfg(not(test))]
use self::backend::RecordCounts;
use self::backend::{Backend, Bytes, OpenOptions};
#[cfg(test)]
pub(crate) use self::backend::{RecordCounts, clean_mark_text, parse_clean_mark};
use self::bulk::{Bulk, BulkList, Maintenance};
use self::commit::GroupCommit;
use self::index::PendingIndex;
use super::{Common, EmptyLease, Engine, LeaseState, Outgoing, Rules, keep_shown};
use crate::fs::sync_dir;
use crate::message::{BulkSend, MessageId};
use crate::recipients::Recipients;
use crate::record::{self, QuarantinedRecord, Record};
use crate::{Durability, Error, Message, Result, UserId, key};

/// What opening a sled store needs (from the builder).
pub(crate) struct SledOptions {
    pub(crate) path: PathBuf,
    pub(crate) durability: Durability,
    pub(crate) cache_bytes: u64,
    pub(crate) lock_timeout: Duration,
    pub(crate) index_slots: usize,
    pub(crate) disk_reserve: u64,
    pub(crate) skip_fdatasync: bool,
    pub(crate) intake_pause: Duration,
    pub(crate) common: Common,
}

/// A store in a directory, on sled.
pub(crate) struct SledEngine {
    /// Stopped first on drop (it holds only a weak reference to `inner`).
    _intake: intake::Intake,
    inner: Arc<Inner>,
}

impl SledEngine {
    /// Opens (creating if needed) and recovers the store; see `Builder::open`.
    pub(crate) fn open(options: SledOptions) -> Result<SledEngine> {
        let path = options.path;
        if path.exists() && !path.is_dir() {
            return Err(Error::NotADirectory { path });
        }
        // A directory created here must survive a power loss too: its name
        // lives in its parent, which needs an fsync of its own.
        let created: Vec<PathBuf> = path
            .ancestors()
            .take_while(|dir| !dir.as_os_str().is_empty() && !dir.exists())
            .map(Path::to_path_buf)
            .collect();
        std::fs::create_dir_all(&path).map_err(|e| backend::io_error(&path, e))?;
        for dir in &created {
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
            sync_dir(parent.unwrap_or(Path::new(".")))?;
        }
        let canonical = std::fs::canonicalize(&path).map_err(|e| backend::io_error(&path, e))?;
        let registration = Registration::new(canonical)
            .ok_or_else(|| Error::AlreadyOpen { path: path.clone() })?;
        let backend = Backend::open(&OpenOptions {
            path: &path,
            cache_bytes: options.cache_bytes,
            flush_every: match options.durability {
                Durability::Immediate => Some(Duration::from_millis(500)),
                Durability::Periodic(every) => Some(every),
            },
            lock_timeout: options.lock_timeout,
            disk_reserve: options.disk_reserve,
            skip_fdatasync: options.skip_fdatasync,
        })?;
        let commit = match options.durability {
            Durability::Immediate => {
                let flusher = backend.clone();
                Some(GroupCommit::new(move || flusher.flush()))
            }
            Durability::Periodic(_) => None,
        };
        let bulks = Arc::new(BulkList::default());
        let maintenance = Maintenance::start(backend.clone(), bulks.clone())?;
        let inner = Inner {
            maintenance,
            bulks,
            commit,
            index: PendingIndex::new(options.index_slots),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            leased: Mutex::new(HashMap::new()),
            leased_count: AtomicUsize::new(0),
            lease_numbers: AtomicU64::new(1),
            lease_timeout: options.common.lease_timeout,
            rules: options.common.rules,
            clock: options.common.clock.clone(),
            notifier: options.common.notifier.clone(),
            intake_pause: options.intake_pause,
            inflight: Mutex::new(HashSet::new()),
            refs: Mutex::new(HashMap::new()),
            last_reap: Mutex::new(Instant::now()),
            filler_budget: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            writes_seen: AtomicU64::new(0),
            deferred: Mutex::new(Vec::new()),
            backend,
            _registration: registration,
        };
        inner.recover()?;
        let dirs = crate::spool::Dirs::of(&path);
        dirs.create()?;
        inner.take_in(&dirs)?;
        let inner = Arc::new(inner);
        let reaper = Arc::downgrade(&inner);
        inner.maintenance.attach(Box::new(move |stop| {
            if let Some(inner) = reaper.upgrade() {
                inner.reap(stop);
            }
        }));
        Ok(SledEngine {
            _intake: intake::Intake::start(Arc::downgrade(&inner), dirs)?,
            inner,
        })
    }
}

impl Drop for SledEngine {
    fn drop(&mut self) {
        // Before the engine lets go of `inner`: the maintenance thread
        // holds it only while it reaps, and must never be the one to drop
        // it (that would join the thread from itself).
        self.inner.maintenance.stop();
    }
}

/// How many `expiry` entries the reaper reads at a time.
const REAP_BATCH: usize = 1024;

/// Filler per reaper round (see `Inner::settle`): two segments of sled's
/// log (sled's default segment size is 512 KiB, which the store keeps).
const FILLER_ROUND: u64 = 1 << 20;

/// No filler once the store's files are this small.
const SETTLED_BYTES: u64 = 3 << 20;

/// Lock stripes: a drain holds its user's stripe while it scans and removes,
/// an insert while it inserts, so a drain sees each sender's messages as a prefix.
const STRIPES: usize = 1024;

/// Paths of the stores open in this process.
static OPEN: LazyLock<Mutex<HashSet<PathBuf>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// This process's claim on a store's path, released on drop.
struct Registration(PathBuf);

impl Registration {
    fn new(path: PathBuf) -> Option<Registration> {
        // Not `bool::then_some`: that would build (and on failure drop) a
        // Registration, whose Drop would take the lock held here and remove
        // the other store's claim.
        let claimed = OPEN.lock().insert(path.clone());
        if claimed {
            Some(Registration(path))
        } else {
            None
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        OPEN.lock().remove(&self.0);
    }
}

// Field order is drop order: the path is released last, after sled has
// closed its files.
struct Inner {
    /// Folds bulk records in the background; stopped first on drop.
    maintenance: Maintenance,
    /// Live bulk records (large bulk sends), in sequence order.
    bulks: Arc<BulkList>,
    commit: Option<GroupCommit>,
    index: PendingIndex,
    stripes: Box<[Mutex<()>]>,
    /// Keys currently leased, with their lease's number and deadline:
    /// hidden from drains until committed, released or past the deadline.
    leased: Mutex<HashMap<Bytes, (u64, Instant)>>,
    leased_count: AtomicUsize,
    lease_numbers: AtomicU64,
    lease_timeout: Duration,
    /// For spooled sends, which reach the engine directly.
    rules: Rules,
    /// The store's wall clock, for expiry.
    clock: Arc<dyn crate::Clock>,
    /// Wakes watchers: messages back from a released lease, spooled sends.
    notifier: Arc<crate::live::Notifier>,
    /// Test-only: a pause between storing a spooled send and removing its file.
    intake_pause: Duration,
    /// Bulk sends being written: their records are not visible yet.
    inflight: Mutex<HashSet<u64>>,
    /// Live recipients of each shared text; at zero the text is removed.
    refs: Mutex<HashMap<u64, u64>>,
    /// When the reaper last ran (for telling watchers about leases that
    /// timed out since).
    last_reap: Mutex<Instant>,
    /// Bytes of filler the reaper may still write (see `Inner::settle`).
    filler_budget: AtomicU64,
    /// Counts writes (each `commit`), so that the reaper writes filler only
    /// while no one else writes: `writes` as of the last reaper round.
    writes: AtomicU64,
    writes_seen: AtomicU64,
    /// Recipients of reaped bulk sends whose lease held the message when
    /// the reaper passed them: settled once the lease ends.
    deferred: Mutex<Vec<(Arc<Bulk>, Vec<u8>)>>,
    backend: Backend,
    _registration: Registration,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.maintenance.stop();
        if self.backend.is_poisoned() {
            // sled's own final flush would wait forever for the write that
            // failed: leak its handles instead (the process should restart).
            tracing::error!(
                path = %self.backend.path().display(),
                "closing a message store after a failed disk write; its files stay locked until the process exits"
            );
            std::mem::forget(self.backend.clone());
            return;
        }
        if let Err(error) = self
            .backend
            .flush()
            .and_then(|()| self.backend.write_clean_mark())
        {
            tracing::warn!(%error, "could not record a clean close of the message store");
        }
    }
}

/// What a read of one user's queue found.
#[derive(Default)]
struct Collected {
    /// In send order.
    messages: Vec<Message>,
    /// The user's own records among them (removed by a drain).
    records: Vec<(Bytes, Bytes)>,
    /// Small bulk sends among them, whose shared text loses a recipient.
    shared: Vec<u64>,
    /// Large bulk sends and announcements among them, and the keys of the
    /// taken marks a drain writes.
    bulks: Vec<(Arc<Bulk>, Vec<u8>)>,
    /// The `expiry` entries of the records among them (removed after them).
    expiries: Vec<Vec<u8>>,
}

impl Collected {
    /// Records and bulk messages: what the index counted (announcements
    /// are not counted).
    fn count(&self) -> u32 {
        let bulks = self.bulks.iter().filter(|(bulk, _)| !bulk.everyone).count();
        u32::try_from(self.records.len() + bulks).unwrap_or(u32::MAX)
    }

    /// The keys that hide these messages from other drains while leased.
    fn lease_keys(&self) -> impl Iterator<Item = &[u8]> {
        self.records
            .iter()
            .map(|(key, _)| key.as_ref())
            .chain(self.bulks.iter().map(|(_, mark)| mark.as_slice()))
    }
}

impl Engine for SledEngine {
    fn describe(&self, f: &mut fmt::DebugStruct<'_, '_>) {
        f.field("engine", &"sled")
            .field("path", &self.inner.backend.path());
    }

    fn path(&self) -> &Path {
        self.inner.backend.path()
    }

    fn send(&self, user: &UserId, message: &Outgoing) -> Result<MessageId> {
        let inner = &self.inner;
        let prefix = key::user_prefix(user)?;
        inner.backend.check_space()?;
        let id = inner.backend.next_id()?;
        let key = key::message_key(&prefix, id);
        let slot = inner.index.slot(&prefix);
        inner.index.add(slot, 1);
        let value = record::encode_inline(message);
        // The expiry entry first: a crash can leave it without its record
        // (dropped when due), never a record the reaper does not know.
        let inserted = match message.expires_at_ms {
            Some(at) => inner.backend.insert_expiry(at, &key),
            None => Ok(()),
        }
        .and_then(|()| inner.insert_locked(slot, &key, &value));
        if let Err(error) = inserted {
            inner.index.sub(slot, 1);
            return Err(error);
        }
        if let Err(error) = inner.commit() {
            // Undo, so that an error means "not queued". The undo reaches the
            // disk with the next successful flush.
            if inner.backend.remove_message(&key).is_ok() {
                inner.index.sub(slot, 1);
            }
            return Err(error);
        }
        if let Some(replace_key) = &message.replace_key {
            inner.replace_older(&prefix, slot, replace_key, id);
        }
        Ok(MessageId(id))
    }

    fn send_few(
        &self,
        users: &[UserId],
        message: &Outgoing,
        progress: &mut dyn FnMut(u64),
    ) -> Result<BulkSend> {
        let inner = &self.inner;
        inner.backend.check_space()?;
        let id = inner.backend.next_id()?;
        inner.inflight.lock().insert(id);
        let written = inner.write_recipients(id, users, message.expires_at_ms, progress);
        let result = written.and_then(|recipients| {
            if recipients == 0 {
                return Ok(0);
            }
            inner.refs.lock().insert(id, recipients);
            // The commit point: recipients' records are visible from here on.
            let text = record::encode_text(message);
            inner.backend.insert_text(id, &text).map(|()| recipients)
        });
        // Visible (or, after a failure, orphaned: skipped and cleaned up by
        // later reads) from here on.
        inner.inflight.lock().remove(&id);
        let recipients = match result {
            Ok(recipients) => recipients,
            Err(error) => {
                inner.refs.lock().remove(&id);
                return Err(error);
            }
        };
        if recipients == 0 {
            return Ok(BulkSend::none());
        }
        if let Err(error) = inner.commit() {
            // Un-commit: without its text the records are orphans.
            let _ = inner.backend.remove_text(&key::text_key(id));
            inner.refs.lock().remove(&id);
            return Err(error);
        }
        if let Some(replace_key) = &message.replace_key {
            for user in users {
                if let Ok(prefix) = key::user_prefix(user) {
                    let slot = inner.index.slot(&prefix);
                    inner.replace_older(&prefix, slot, replace_key, id);
                }
            }
        }
        Ok(BulkSend {
            id: Some(MessageId(id)),
            recipients,
        })
    }

    fn send_bulk(&self, users: Recipients, message: &Outgoing) -> Result<BulkSend> {
        self.inner.send_bulk_record(users, message)
    }

    fn send_everyone(&self, message: &Outgoing) -> Result<MessageId> {
        self.inner.send_announcement(message)
    }

    fn drain(&self, user: &UserId) -> Result<Vec<Message>> {
        let inner = &self.inner;
        let prefix = key::user_prefix(user)?;
        let slot = inner.index.slot(&prefix);
        if inner.certainly_empty(user, slot) {
            return Ok(Vec::new());
        }
        let collected = {
            let _drain = inner.stripe(slot).lock();
            let collected = inner.collect(user, &prefix, slot, true)?;
            inner.remove(slot, &collected)?;
            collected
        };
        inner.finish_removal(user, slot, collected)
    }

    fn may_have(&self, user: &UserId) -> bool {
        key::user_prefix(user).is_ok_and(|prefix| {
            !self
                .inner
                .certainly_empty(user, self.inner.index.slot(&prefix))
        })
    }

    fn peek(&self, user: &UserId) -> Result<Vec<Message>> {
        let inner = &self.inner;
        let prefix = key::user_prefix(user)?;
        let slot = inner.index.slot(&prefix);
        if inner.certainly_empty(user, slot) {
            return Ok(Vec::new());
        }
        let _scan = inner.stripe(slot).lock();
        Ok(inner.collect(user, &prefix, slot, false)?.messages)
    }

    fn lease(&self, user: &UserId) -> Result<Box<dyn LeaseState>> {
        let inner = &self.inner;
        let prefix = key::user_prefix(user)?;
        let slot = inner.index.slot(&prefix);
        if inner.certainly_empty(user, slot) {
            return Ok(Box::new(EmptyLease));
        }
        let number = inner.lease_numbers.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + inner.lease_timeout;
        let collected = {
            let _drain = inner.stripe(slot).lock();
            let collected = inner.collect(user, &prefix, slot, true)?;
            let mut leased = inner.leased.lock();
            for key in collected.lease_keys() {
                leased.insert(Bytes::from(key), (number, deadline));
            }
            inner.leased_count.store(leased.len(), Ordering::Release);
            collected
        };
        Ok(Box::new(SledLease {
            inner: inner.clone(),
            user: user.clone(),
            slot,
            number,
            deadline,
            collected: Some(collected),
        }))
    }

    fn users(&self) -> Result<Vec<UserId>> {
        let mut users = std::collections::BTreeSet::new();
        let mut last: Option<Vec<u8>> = None;
        for item in self.inner.backend.all_messages() {
            let (key, _) = item?;
            let Some((prefix, _)) = key::split_key(&key) else {
                continue;
            };
            if last.as_deref() == Some(prefix) {
                continue;
            }
            last = Some(prefix.to_vec());
            users.extend(key::decode_user(prefix));
        }
        // An announcement's set holds its takers, not users who may have it.
        for bulk in self.inner.bulks.snapshot().iter().filter(|b| !b.everyone) {
            users.extend(bulk.recipients().users());
        }
        Ok(users.into_iter().collect())
    }

    fn bulk_records(&self) -> Result<u64> {
        let bulks = self.inner.bulks.snapshot();
        Ok(bulks.iter().filter(|bulk| !bulk.everyone).count() as u64)
    }

    fn flush(&self) -> Result<()> {
        self.inner.backend.flush()
    }

    fn size_on_disk(&self) -> Result<u64> {
        self.inner.backend.size_on_disk()
    }

    fn quarantined(&self) -> Result<Vec<QuarantinedRecord>> {
        self.inner.backend.quarantined()
    }
}

/// Messages hidden from other drains by their keys in `Inner::leased`.
struct SledLease {
    inner: Arc<Inner>,
    user: UserId,
    slot: usize,
    number: u64,
    deadline: Instant,
    collected: Option<Collected>,
}

impl LeaseState for SledLease {
    fn messages(&self) -> &[Message] {
        self.collected
            .as_ref()
            .map_or(&[], |collected| collected.messages.as_slice())
    }

    fn commit(mut self: Box<Self>) -> Result<Vec<Message>> {
        let Some(collected) = self.collected.take() else {
            return Ok(Vec::new());
        };
        let inner = &self.inner;
        let removed = {
            // Under the stripe: a drain that could take expired messages
            // back holds it too. The keys are unleased under it as well: a
            // drain skips leased keys, the taken marks just written among
            // them, so unleasing after it let a drain see a bulk message
            // neither leased nor taken and deliver it again
            // (bulk_record's concurrent test, about 1 run in 40).
            let _drain = inner.stripe(self.slot).lock();
            let removed = if Instant::now() >= self.deadline {
                Err(Error::LeaseExpired {
                    timeout: inner.lease_timeout,
                })
            } else {
                inner.remove(self.slot, &collected)
            };
            inner.unlease(&collected, self.number);
            removed
        };
        if let Err(error) = removed {
            // Back in the queue (the lease timed out).
            inner.notifier.user(&self.user);
            return Err(error);
        }
        inner.finish_removal(&self.user, self.slot, collected)
    }

    fn release(mut self: Box<Self>) {
        self.give_back();
    }
}

impl SledLease {
    /// Puts the messages back and wakes the user's watchers: an open page
    /// may take them now.
    fn give_back(&mut self) {
        if let Some(collected) = self.collected.take() {
            self.inner.unlease(&collected, self.number);
            if let Err(error) = self.inner.drop_replaced(&self.user, self.slot, &collected) {
                tracing::warn!(%error, "could not remove released messages replaced meanwhile; they stay hidden while their replacement is queued");
            }
            if collected.count() > 0 || !collected.bulks.is_empty() {
                self.inner.notifier.user(&self.user);
            }
        }
    }
}

impl Drop for SledLease {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl Inner {
    fn stripe(&self, slot: usize) -> &Mutex<()> {
        &self.stripes[slot % STRIPES]
    }

    /// The store's clock, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64 {
        crate::clock::now_ms(&*self.clock)
    }

    /// `true` only when `user` certainly has nothing to read: the index
    /// counts nothing for the user's slot and no live announcement waits
    /// for them (announcements are not counted: they are for everyone).
    fn certainly_empty(&self, user: &UserId, slot: usize) -> bool {
        self.index.is_empty(slot) && !self.announcement_waits(user)
    }

    /// Whether a live announcement may still be for `user` (a hint: true
    /// for a taker whose drain is still finishing).
    fn announcement_waits(&self, user: &UserId) -> bool {
        if !self.bulks.has_announcements() {
            return false;
        }
        let now_ms = self.now_ms();
        self.bulks
            .snapshot()
            .iter()
            .any(|bulk| bulk.everyone && !bulk.expired(now_ms) && bulk.untaken_by(user))
    }

    /// An announcement: one bulk record for every user, whose set lists
    /// the users who have taken it (none yet). Not counted in the index.
    fn send_announcement(&self, message: &Outgoing) -> Result<MessageId> {
        self.backend.check_space()?;
        let value = record::encode_bulk(message, true, &Recipients::default());
        let bulk = {
            let _commit = self.bulks.commit.lock();
            let id = self.backend.next_id()?;
            self.backend.insert_bulk(id, &value)?;
            let bulk = Arc::new(Bulk::new(id, message.clone(), true, Recipients::default()));
            self.bulks.push(bulk.clone());
            bulk
        };
        if let Err(error) = self.commit() {
            // Un-commit, so that an error means "not sent".
            bulk.kill();
            self.bulks.remove(bulk.id);
            let _ = self.backend.remove_bulk(bulk.id);
            return Err(error);
        }
        Ok(MessageId(bulk.id))
    }

    /// After a durable keyed send `below` to the user of `prefix`: removes
    /// the user's older queued (not leased) records with the same key.
    /// They are already hidden by [`shown`](super::shown) at read, so a failure here is
    /// only logged: their space comes back when they are read or expire.
    fn replace_older(&self, prefix: &[u8], slot: usize, replace_key: &str, below: u64) {
        let _replace = self.stripe(slot).lock();
        if let Err(error) = self.replace_older_locked(prefix, slot, replace_key, below) {
            tracing::warn!(%error, "could not remove messages replaced by a newer one; they stay hidden");
        }
    }

    /// [`replace_older`](Self::replace_older), with the user's stripe held.
    fn replace_older_locked(
        &self,
        prefix: &[u8],
        slot: usize,
        replace_key: &str,
        below: u64,
    ) -> Result<()> {
        let any_leased = self.leased_count.load(Ordering::Acquire) > 0;
        let mut removed = Vec::new();
        let mut expiries = Vec::new();
        let mut shared = Vec::new();
        for (key, value) in self.backend.scan(prefix)? {
            let Some((_, seq)) = key::split_key(&key) else {
                continue;
            };
            // Keys are in send order: the rest is newer.
            if seq >= below {
                break;
            }
            // A leased one stays with its lease (see `Draft::replace_key`).
            if any_leased && self.leased.lock().contains_key(&key) {
                continue;
            }
            let message = match record::decode_record(&value) {
                Ok(Record::Inline(message)) => message,
                Ok(Record::Shared) => {
                    if self.inflight.lock().contains(&seq) {
                        continue;
                    }
                    match self.backend.get_text(seq)? {
                        Some(bytes) => match record::decode_text(&bytes) {
                            Ok(text) => {
                                if text.replace_key.as_deref() == Some(replace_key) {
                                    shared.push(seq);
                                }
                                text
                            }
                            Err(_) => continue,
                        },
                        None => continue,
                    }
                }
                // Marks, and damaged records (reported when read).
                _ => continue,
            };
            if message.replace_key.as_deref() != Some(replace_key) {
                continue;
            }
            if let Some(at) = message.expires_at_ms {
                expiries.push(backend::expiry_key(at, &key));
            }
            removed.push(key);
        }
        if !removed.is_empty() {
            self.backend.remove_messages(&removed)?;
            self.index
                .sub(slot, u32::try_from(removed.len()).unwrap_or(u32::MAX));
            for entry in &expiries {
                self.backend.remove_expiry(entry)?;
            }
            self.release_shared(&shared);
        }
        self.take_replaced_copies(prefix, slot, replace_key, below)
    }

    /// Takes (writes the taken mark of, undelivered) the user's untaken,
    /// unleased copies of bulk sends and announcements older than `below`
    /// with `replace_key`: replaced, they must not come back once their
    /// replacement is delivered or reaped. With the user's stripe held.
    fn take_replaced_copies(
        &self,
        prefix: &[u8],
        slot: usize,
        replace_key: &str,
        below: u64,
    ) -> Result<()> {
        let bulks = self.bulks.snapshot();
        let candidates = bulks.iter().filter(|bulk| {
            bulk.id < below && bulk.message.replace_key.as_deref() == Some(replace_key)
        });
        let mut user = None;
        for bulk in candidates {
            // One being reaped is the reaper's (it replaces for it too).
            if bulk.is_dead() {
                continue;
            }
            let user = match &user {
                Some(user) => user,
                None => match key::decode_user(prefix) {
                    Some(decoded) => user.insert(decoded),
                    None => return Ok(()),
                },
            };
            if !bulk.lists(user) {
                continue;
            }
            let mark = key::message_key(prefix, bulk.id);
            if self.backend.get_message(&mark)?.is_some() {
                continue;
            }
            if self.leased_count.load(Ordering::Acquire) > 0
                && self.leased.lock().contains_key(mark.as_slice())
            {
                continue;
            }
            self.backend
                .insert_message(&mark, &record::encode_taken(&[]))?;
            if !bulk.everyone {
                self.index.sub(slot, 1);
            }
            // Dead since the check above: the reaper finds the mark.
            if bulk.note_taken(user) && bulk.due() {
                self.maintenance.fold(bulk.id);
            }
        }
        Ok(())
    }

    /// After a lease is released: a released message with a replace key
    /// that a newer message with its key (queued or leased) replaced
    /// meanwhile stays replaced, also once that one is delivered or
    /// reaped: it goes now.
    fn drop_replaced(&self, user: &UserId, slot: usize, released: &Collected) -> Result<()> {
        let text_key = |seq: u64| -> Result<Option<String>> {
            Ok(match self.backend.get_text(seq)? {
                Some(bytes) => record::decode_text(&bytes)
                    .ok()
                    .and_then(|text| text.replace_key),
                None => None,
            })
        };
        let mut keys: HashMap<String, u64> = HashMap::new();
        let mut note = |key: Option<String>, id: u64| {
            if let Some(key) = key {
                let oldest = keys.entry(key).or_insert(id);
                *oldest = (*oldest).min(id);
            }
        };
        for (key, value) in &released.records {
            let Some((_, seq)) = key::split_key(key) else {
                continue;
            };
            match record::decode_record(value) {
                Ok(Record::Inline(message)) => note(message.replace_key, seq),
                Ok(Record::Shared) => note(text_key(seq)?, seq),
                _ => {}
            }
        }
        for (bulk, _) in &released.bulks {
            note(bulk.message.replace_key.clone(), bulk.id);
        }
        if keys.is_empty() {
            return Ok(());
        }
        let prefix = key::user_prefix(user)?;
        let _replace = self.stripe(slot).lock();
        // The newest message with each key, queued or leased.
        let mut newest: HashMap<String, u64> = HashMap::new();
        let mut seen = |key: Option<String>, id: u64| {
            if let Some(key) = key
                && keys.contains_key(&key)
            {
                let latest = newest.entry(key).or_insert(id);
                *latest = (*latest).max(id);
            }
        };
        for (key, value) in self.backend.scan(&prefix)? {
            let Some((_, seq)) = key::split_key(&key) else {
                continue;
            };
            match record::decode_record(&value) {
                Ok(Record::Inline(message)) => seen(message.replace_key, seq),
                Ok(Record::Shared) => seen(text_key(seq)?, seq),
                _ => {}
            }
        }
        for bulk in self.bulks.snapshot().iter() {
            if bulk.message.replace_key.is_some()
                && bulk.lists(user)
                && self
                    .backend
                    .get_message(&key::message_key(&prefix, bulk.id))?
                    .is_none()
            {
                seen(bulk.message.replace_key.clone(), bulk.id);
            }
        }
        for (key, oldest) in keys {
            if let Some(&latest) = newest.get(&key)
                && latest > oldest
            {
                self.replace_older_locked(&prefix, slot, &key, latest)?;
            }
        }
        Ok(())
    }

    /// Takes one recipient off each of these shared texts (their records
    /// are removed) and removes the texts no one needs any more.
    fn release_shared(&self, ids: &[u64]) {
        if ids.is_empty() {
            return;
        }
        let mut unused = Vec::new();
        {
            let mut refs = self.refs.lock();
            for id in ids {
                if let Some(count) = refs.get_mut(id) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        refs.remove(id);
                        unused.push(*id);
                    }
                }
            }
        }
        for id in unused {
            // After the records: a crash in between leaves an unused text,
            // which the next open removes.
            if let Err(error) = self.backend.remove_text(&key::text_key(id)) {
                tracing::warn!(%error, id, "could not remove a delivered shared text; it is removed at the next open");
            }
        }
    }

    /// The reaper, every [`REAP_EVERY`](super::REAP_EVERY) on the
    /// maintenance thread: removes the expired records and bulk records no
    /// one has read, and wakes the watchers of leases that timed out.
    /// Nothing visible changes (reads never show expired messages), so it
    /// wakes no one else.
    fn reap(&self, stop: &std::sync::atomic::AtomicBool) {
        let now_ms = self.now_ms();
        let started = Instant::now();
        match self.reap_records(now_ms, stop) {
            Ok(0) => {}
            Ok(removed) => tracing::debug!(
                removed,
                elapsed = ?started.elapsed(),
                "reaped expired messages"
            ),
            Err(error) => {
                tracing::warn!(%error, "could not reap expired messages; trying again later");
            }
        }
        if let Err(error) = self.reap_bulks(now_ms, stop) {
            tracing::warn!(%error, "could not reap an expired bulk send; trying again later");
        }
        self.wake_timed_out_leases();
        self.settle();
    }

    /// Removes the records whose `expiry` entry is due; returns how many.
    fn reap_records(&self, now_ms: u64, stop: &std::sync::atomic::AtomicBool) -> Result<u64> {
        let mut after: Option<Bytes> = None;
        let mut removed = 0_u64;
        while !stop.load(Ordering::Acquire) {
            let due = self
                .backend
                .due_expiries(after.as_deref(), now_ms, REAP_BATCH)?;
            let Some(last) = due.last() else {
                break;
            };
            after = Some(last.clone());
            for entry in &due {
                if self.reap_entry(entry, now_ms)? {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Handles one due `expiry` entry: removes its record if it has expired
    /// and is not leased, then the entry; `true` if a record went. A leased
    /// record stays (with its entry) until its lease ends.
    fn reap_entry(&self, entry: &[u8], now_ms: u64) -> Result<bool> {
        let Some((prefix, seq)) =
            backend::split_expiry_key(entry).and_then(|(_, key)| key::split_key(key))
        else {
            self.backend.remove_expiry(entry)?;
            return Ok(false);
        };
        let key = &entry[8..];
        let slot = self.index.slot(prefix);
        let (shared, value_len) = {
            let _reap = self.stripe(slot).lock();
            if self.leased_count.load(Ordering::Acquire) > 0 {
                let now = Instant::now();
                let leased = self
                    .leased
                    .lock()
                    .get(key)
                    .is_some_and(|(_, deadline)| *deadline > now);
                if leased {
                    return Ok(false);
                }
            }
            let Some(value) = self.backend.get_message(key)? else {
                self.backend.remove_expiry(entry)?;
                return Ok(false);
            };
            let (expired, shared) = match record::decode_record(&value) {
                Ok(Record::Inline(message)) => (message.expired(now_ms), false),
                Ok(Record::Shared) => {
                    if self.inflight.lock().contains(&seq) {
                        return Ok(false);
                    }
                    match self.backend.get_text(seq)? {
                        Some(bytes) => match record::decode_text(&bytes) {
                            Ok(text) => (text.expired(now_ms), true),
                            // Reported (and quarantined) when its user reads.
                            Err(_) => (false, false),
                        },
                        // An orphan of a send that failed: it goes too.
                        None => (true, false),
                    }
                }
                _ => (false, false),
            };
            if !expired {
                // Not this entry's record (it cannot expire later: ids are
                // never reused), or damaged: the entry is of no use.
                self.backend.remove_expiry(entry)?;
                return Ok(false);
            }
            self.backend.remove_message(key)?;
            self.index.sub(slot, 1);
            (shared, value.len())
        };
        self.backend.remove_expiry(entry)?;
        let bytes = u64::try_from(entry.len() + key.len() + value_len).unwrap_or(u64::MAX);
        self.filler_budget.fetch_add(bytes, Ordering::AcqRel);
        if shared {
            self.release_shared(&[seq]);
        }
        Ok(true)
    }

    /// Removes expired bulk records and announcements as a whole: the
    /// record, its taken marks, and (for a bulk send) the index's count of
    /// every recipient who had not taken it.
    ///
    /// The record leaves the in-memory list first, so reads started later
    /// do not see it, then the disk (before the marks: a crash leaves only
    /// marks without a record, which the next open removes). For a bulk
    /// send, each recipient is then settled under their lock stripe, where
    /// the mark on disk tells whether a drain took it (and took it off the
    /// index) — a drain that read the list before holds that stripe while
    /// it writes its mark (and a drain that learns afterwards that the
    /// record was reaped leaves its mark for this pass). A recipient whose
    /// lease holds the message is settled when the lease ends (see
    /// [`settle_deferred`](Self::settle_deferred)). The index then stays
    /// exact; only a drain whose final flush fails after the pass may leave
    /// an over-count (rare and harmless: requests of that index slot read
    /// the disk until the next open).
    fn reap_bulks(&self, now_ms: u64, stop: &std::sync::atomic::AtomicBool) -> Result<()> {
        self.settle_deferred()?;
        let expired: Vec<Arc<Bulk>> = self
            .bulks
            .snapshot()
            .iter()
            .filter(|bulk| bulk.expired(now_ms))
            .cloned()
            .collect();
        for bulk in expired {
            if let Some(replace_key) = &bulk.message.replace_key
                && !self.replace_for_untaken(&bulk, replace_key, stop)?
            {
                // Closing: the next open reaps it.
                return Ok(());
            }
            if self.retire_bulk(&bulk)? {
                self.settle_recipients(&bulk, stop)?;
            }
        }
        Ok(())
    }

    /// Before an expired keyed bulk send or announcement goes: it replaced
    /// the older messages with its key of every user who has not taken it
    /// (reads hid them until now), so they go too, as if it had removed
    /// them when it was sent. For an announcement that means every user
    /// with messages: a scan of all keys, for this rare case. Done while
    /// the record is still there, so that a crash cannot bring them back.
    /// `false` if cut short because the store is closing.
    fn replace_for_untaken(
        &self,
        bulk: &Arc<Bulk>,
        replace_key: &str,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<bool> {
        let replace = |prefix: &[u8]| -> Result<()> {
            let Some(user) = key::decode_user(prefix) else {
                return Ok(());
            };
            if !bulk.lists(&user) {
                return Ok(());
            }
            let slot = self.index.slot(prefix);
            let _replace = self.stripe(slot).lock();
            let mark = key::message_key(prefix, bulk.id);
            if self.backend.get_message(&mark)?.is_some() {
                return Ok(());
            }
            self.replace_older_locked(prefix, slot, replace_key, bulk.id)
        };
        if bulk.everyone {
            let mut last: Option<Vec<u8>> = None;
            for item in self.backend.all_messages() {
                if stop.load(Ordering::Acquire) {
                    return Ok(false);
                }
                let (key, _) = item?;
                let Some((prefix, _)) = key::split_key(&key) else {
                    continue;
                };
                if last.as_deref() == Some(prefix) {
                    continue;
                }
                last = Some(prefix.to_vec());
                replace(prefix)?;
            }
        } else {
            for user in bulk.recipients().users() {
                if stop.load(Ordering::Acquire) {
                    return Ok(false);
                }
                replace(&key::user_prefix(&user)?)?;
            }
        }
        Ok(true)
    }

    /// Takes an expired bulk record out of the list and off the disk; for
    /// an announcement also removes its marks. `true` for a bulk send,
    /// whose recipients [`settle_recipients`](Self::settle_recipients)
    /// settles next.
    fn retire_bulk(&self, bulk: &Arc<Bulk>) -> Result<bool> {
        // Drains finishing from now on learn that it was reaped.
        let marked = bulk.kill();
        self.bulks.remove(bulk.id);
        self.backend.remove_bulk(bulk.id)?;
        // Roughly what went: the text, about 2 bytes per listed user,
        // and the marks.
        let bytes = (bulk.message.text.len() as u64)
            .saturating_add(bulk.recipients().len().saturating_mul(2))
            .saturating_add((marked.len()).saturating_mul(32));
        self.filler_budget.fetch_add(bytes, Ordering::AcqRel);
        if bulk.everyone {
            for user in marked.users() {
                let prefix = key::user_prefix(&user)?;
                self.backend
                    .remove_message(&key::message_key(&prefix, bulk.id))?;
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// After [`retire_bulk`](Self::retire_bulk): settles each recipient of
    /// a bulk send, under their lock stripe (see [`reap_bulks`](Self::reap_bulks)).
    fn settle_recipients(
        &self,
        bulk: &Arc<Bulk>,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<()> {
        for user in bulk.recipients().users() {
            if stop.load(Ordering::Acquire) {
                // The index over-counts the rest until the next open.
                return Ok(());
            }
            let prefix = key::user_prefix(&user)?;
            let slot = self.index.slot(&prefix);
            let mark = key::message_key(&prefix, bulk.id);
            let _settle = self.stripe(slot).lock();
            if self.backend.take_message(&mark)? {
                // Taken: that drain took it off the index.
                continue;
            }
            let now = Instant::now();
            let leased = self.leased_count.load(Ordering::Acquire) > 0
                && self
                    .leased
                    .lock()
                    .get(mark.as_slice())
                    .is_some_and(|(_, deadline)| *deadline > now);
            if leased {
                // Settled when the lease ends: a commit takes it off the
                // index, a release leaves that to the reaper.
                self.deferred.lock().push((bulk.clone(), prefix));
                continue;
            }
            self.index.sub(slot, 1);
        }
        Ok(())
    }

    /// Settles the recipients of reaped bulk sends whose lease held the
    /// message when the reaper passed them, once that lease has ended: a
    /// commit wrote a mark (and took the message off the index), which
    /// goes; otherwise the message comes off the index now.
    fn settle_deferred(&self) -> Result<()> {
        let deferred = std::mem::take(&mut *self.deferred.lock());
        let mut waiting = Vec::new();
        for (bulk, prefix) in deferred {
            let slot = self.index.slot(&prefix);
            let mark = key::message_key(&prefix, bulk.id);
            let _settle = self.stripe(slot).lock();
            if self.backend.take_message(&mark)? {
                continue;
            }
            let now = Instant::now();
            let leased = self
                .leased
                .lock()
                .get(mark.as_slice())
                .is_some_and(|(_, deadline)| *deadline > now);
            if leased {
                waiting.push((bulk, prefix));
            } else {
                self.index.sub(slot, 1);
            }
        }
        self.deferred.lock().extend(waiting);
        Ok(())
    }

    /// Helps sled give back the space of what the reaper removed.
    ///
    /// sled 0.34 frees a segment of its log once the data left in it has
    /// been copied out, but only when a later segment fills up, and it
    /// shortens its file only from the end. A store that stops writing
    /// (everything expired, no one sends) would keep its whole file: on a
    /// store emptied of 21 MiB of expired messages the file stayed at
    /// 35 MiB for minutes. So after a reap, while no one else writes
    /// (other writes fill segments anyway) and the files are larger than
    /// [`SETTLED_BYTES`], the reaper writes *filler* (one key set and
    /// removed again, garbage at once), [`FILLER_ROUND`] per round, up to
    /// as many bytes as it removed: the same store then came back to
    /// 2.5–3.5 MiB within about 10 s (`tests/sled_expiry.rs`).
    fn settle(&self) {
        let writes = self.writes.load(Ordering::Relaxed);
        let quiet = self.writes_seen.swap(writes, Ordering::Relaxed) == writes;
        let budget = self.filler_budget.load(Ordering::Acquire);
        if !quiet || budget == 0 {
            return;
        }
        match self.backend.size_on_disk() {
            Ok(size) if size > SETTLED_BYTES => {}
            // Small enough: nothing to give back.
            _ => {
                self.filler_budget.store(0, Ordering::Release);
                return;
            }
        }
        let round = budget.min(FILLER_ROUND);
        self.filler_budget.store(budget - round, Ordering::Release);
        if let Err(error) = self.backend.write_filler(round) {
            tracing::warn!(%error, "could not write filler to help sled give disk space back");
        }
        // The filler's own writes do not count as someone else's.
        self.writes_seen
            .store(self.writes.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Wakes the watchers of users whose lease timed out since the last
    /// reap: their messages are back in the queue.
    fn wake_timed_out_leases(&self) {
        let now = Instant::now();
        let since = std::mem::replace(&mut *self.last_reap.lock(), now);
        if self.leased_count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut prefixes: Vec<Vec<u8>> = self
            .leased
            .lock()
            .iter()
            .filter(|(_, (_, deadline))| *deadline > since && *deadline <= now)
            .filter_map(|(key, _)| key::split_key(key).map(|(prefix, _)| prefix.to_vec()))
            .collect();
        prefixes.sort_unstable();
        prefixes.dedup();
        for prefix in prefixes {
            self.notifier.prefix(&prefix);
        }
    }

    /// Inserts a record while holding its user's lock stripe, so that a
    /// drain's scan never runs beside it. sled's iterators are not
    /// snapshots: without the lock, a scan that had passed a sender's first
    /// key could still see that sender's second message, inserted a moment
    /// later, and deliver it before the first (found by
    /// `tests/concurrent_drain.rs`, about one run in sixty).
    fn insert_locked(&self, slot: usize, key: &[u8], value: &[u8]) -> Result<bool> {
        let _scan = self.stripe(slot).lock();
        self.backend.insert_message(key, value)
    }

    /// Waits until earlier writes are durable, when the store promises that.
    fn commit(&self) -> Result<()> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        match &self.commit {
            Some(group) => group.wait(),
            None => Ok(()),
        }
    }

    /// A large bulk send: one record holding the text and the recipient set
    /// (see `bulk.rs`), built and checked by the caller. The record gets its
    /// sequence number and becomes visible under the bulk commit lock.
    fn send_bulk_record(&self, set: Recipients, message: &Outgoing) -> Result<BulkSend> {
        self.backend.check_space()?;
        let value = record::encode_bulk(message, false, &set);
        let recipients = set.len();
        let bulk = {
            let _commit = self.bulks.commit.lock();
            let id = self.backend.next_id()?;
            self.backend.insert_bulk(id, &value)?;
            // Counted before it becomes visible (the index's invariant).
            self.count_recipients(&set, true);
            let bulk = Arc::new(Bulk::new(id, message.clone(), false, set));
            self.bulks.push(bulk.clone());
            bulk
        };
        if let Err(error) = self.commit() {
            // Un-commit, so that an error means "not queued".
            self.bulks.remove(bulk.id);
            if self.backend.remove_bulk(bulk.id).is_ok() {
                self.count_recipients(&bulk.recipients(), false);
            }
            return Err(error);
        }
        Ok(BulkSend {
            id: Some(MessageId(bulk.id)),
            recipients,
        })
    }

    /// Adds (or takes away) one queued message for every user in `set`.
    fn count_recipients(&self, set: &Recipients, add: bool) {
        let count = |prefix: &[u8]| {
            let slot = self.index.slot(prefix);
            if add {
                self.index.add(slot, 1);
            } else {
                self.index.sub(slot, 1);
            }
        };
        let mut prefix = [0_u8; 9];
        for id in &set.ints {
            key::write_int_prefix(&mut prefix, id);
            count(&prefix);
        }
        for name in &set.strs {
            if let Ok(prefix) = key::user_prefix(&UserId::Str(name.clone())) {
                count(&prefix);
            }
        }
    }

    /// Writes a bulk send's recipient records. Returns how many.
    ///
    /// One insert each, not sled batches: sled 0.34 writes out its log
    /// buffer for every batch, which made bulk sends 3× slower and used
    /// gigabytes of memory. All-or-nothing comes from the commit point (the
    /// shared text, written last), not from batching.
    fn write_recipients(
        &self,
        id: u64,
        users: &[UserId],
        expires_at_ms: Option<u64>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64> {
        let value = record::encode_shared();
        let mut key = Vec::with_capacity(64);
        let mut written = 0_u64;
        for user in users {
            key::write_message_key(&mut key, user, id)?;
            let slot = self.index.slot(&key[..key.len() - key::SEQ_LEN]);
            self.index.add(slot, 1);
            let inserted = match expires_at_ms {
                Some(at) => self.backend.insert_expiry(at, &key),
                None => Ok(()),
            }
            .and_then(|()| self.insert_locked(slot, &key, &value));
            match inserted {
                Ok(true) => written += 1,
                // The same user listed again: one record, counted once.
                Ok(false) => {
                    self.index.sub(slot, 1);
                    continue;
                }
                Err(error) => {
                    self.index.sub(slot, 1);
                    return Err(error);
                }
            }
        }
        progress(written);
        Ok(written)
    }

    /// Reads one user's queue. Orphans (records of a bulk send that failed or
    /// was cut off by a crash) are removed; a damaged record is quarantined
    /// and reported as [`Error::Corrupt`].
    fn collect(
        &self,
        user: &UserId,
        prefix: &[u8],
        slot: usize,
        skip_leased: bool,
    ) -> Result<Collected> {
        let mut collected = Collected::default();
        let mut orphans = Vec::new();
        let mut taken = Vec::new();
        let now_ms = self.now_ms();
        let mut records = self.backend.scan(prefix)?;
        let any_leased = skip_leased && self.leased_count.load(Ordering::Acquire) > 0;
        let now = Instant::now();
        let is_leased = |key: &[u8]| {
            self.leased
                .lock()
                .get(key)
                .is_some_and(|(_, deadline)| *deadline > now)
        };
        if any_leased {
            records.retain(|(key, _)| !is_leased(key));
        }
        for (key, value) in records {
            let Some((_, seq)) = key::split_key(&key) else {
                return Err(self.quarantine(
                    slot,
                    "messages",
                    &key,
                    &value,
                    "the key is not a user and a sequence number",
                ));
            };
            let message = match record::decode_record(&value) {
                Err(reason) => return Err(self.quarantine(slot, "messages", &key, &value, &reason)),
                Ok(Record::Inline(message)) => message.into_message(seq),
                Ok(Record::Taken { .. }) => {
                    taken.push(seq);
                    continue;
                }
                Ok(Record::Shared) => {
                    // Check in-flight first: a send leaves that set only after
                    // its text is written, so "not in flight, no text" is an orphan.
                    if self.inflight.lock().contains(&seq) {
                        continue;
                    }
                    let Some(bytes) = self.backend.get_text(seq)? else {
                        orphans.push(key);
                        continue;
                    };
                    match record::decode_text(&bytes) {
                        Ok(text) => {
                            collected.shared.push(seq);
                            text.into_message(seq)
                        }
                        Err(reason) => {
                            self.refs.lock().remove(&seq);
                            let text_key = key::text_key(seq);
                            let _ = self.quarantine(slot, "texts", &text_key, &bytes, &reason);
                            return Err(self.quarantine(
                                slot,
                                "messages",
                                &key,
                                &value,
                                &format!("its shared text is damaged: {reason}"),
                            ));
                        }
                    }
                }
            };
            if let Some(at) = message.expires_at_ms {
                collected.expiries.push(backend::expiry_key(at, &key));
            }
            collected.messages.push(message);
            collected.records.push((key, value));
        }
        // After the scan, under the user's stripe: a bulk send that
        // committed before any record the scan saw is in this list.
        let bulks = self.bulks.snapshot();
        let mut merged = false;
        for bulk in bulks.iter() {
            if taken.contains(&bulk.id) || !bulk.lists(user) {
                continue;
            }
            let expired = bulk.expired(now_ms);
            let mark = key::message_key(prefix, bulk.id);
            if any_leased && is_leased(&mark) {
                continue;
            }
            collected.messages.push(bulk.message.message(bulk.id));
            merged = true;
            // An expired bulk send or announcement still replaces the
            // user's older messages with its key (until reaped, and the
            // reaper then removes those), but is not taken: the reaper
            // removes it as a whole.
            if !expired {
                collected.bulks.push((bulk.clone(), mark));
            }
        }
        if merged {
            collected.messages.sort_by_key(|m| m.id);
        }
        // Expired and replaced messages are taken (removed by a drain or a
        // lease's commit) but not returned.
        let messages = std::mem::take(&mut collected.messages);
        collected.messages = keep_shown(messages, now_ms);
        if !orphans.is_empty() {
            self.backend.remove_messages(&orphans)?;
            self.index
                .sub(slot, u32::try_from(orphans.len()).unwrap_or(u32::MAX));
        }
        Ok(collected)
    }

    /// Moves a damaged record aside and returns the error to report.
    fn quarantine(&self, slot: usize, tree: &str, key: &[u8], value: &[u8], reason: &str) -> Error {
        let what = match key::split_key(key) {
            Some((prefix, seq)) if tree == "messages" => match key::decode_user(prefix) {
                Some(user) => format!("for user {user} (message {seq})"),
                None => format!("with key {key:02x?}"),
            },
            _ => format!("in {tree} with key {key:02x?}"),
        };
        tracing::warn!(%what, %reason, "moving a damaged record to quarantine");
        match self.backend.quarantine(tree, key, value, reason) {
            Ok(()) => {
                if tree == "messages" {
                    self.index.sub(slot, 1);
                }
                Error::Corrupt {
                    what,
                    reason: reason.to_owned(),
                }
            }
            Err(error) => error,
        }
    }

    /// Removes drained records. Not one sled batch (sled writes out its log
    /// buffer for each): a concurrent drain cannot interleave (the caller
    /// holds the user's lock stripe), and a crash part-way affects only a
    /// drain that was never acknowledged.
    ///
    /// A drain that takes bulk messages is atomic: with one bulk message
    /// (the usual case), its taken mark lists the records the drain removes
    /// and is written first, as one insert that commits the whole drain;
    /// recovery at open finishes removals that a crash cut off. With several,
    /// the marks and removals go in one sled batch (slower: sled 0.34 writes
    /// out its log buffer for each batch).
    fn remove(&self, slot: usize, collected: &Collected) -> Result<()> {
        if collected.records.is_empty() && collected.bulks.is_empty() {
            return Ok(());
        }
        let keys: Vec<&[u8]> = collected
            .records
            .iter()
            .map(|(key, _)| key.as_ref())
            .collect();
        match collected.bulks.as_slice() {
            [] => self.backend.remove_messages(&keys)?,
            [(_, mark)] => {
                let removed: Vec<u64> = keys
                    .iter()
                    .filter_map(|key| key::split_key(key).map(|(_, seq)| seq))
                    .collect();
                self.backend
                    .insert_message(mark, &record::encode_taken(&removed))?;
                self.backend.remove_messages(&keys)?;
            }
            several => {
                let marks: Vec<&[u8]> = several.iter().map(|(_, m)| m.as_slice()).collect();
                self.backend.apply_drain(&marks, &keys)?;
            }
        }
        self.index.sub(slot, collected.count());
        Ok(())
    }

    /// After a removal: waits for durability (putting the records back if
    /// that fails), then releases shared texts no one needs any more.
    fn finish_removal(
        &self,
        user: &UserId,
        slot: usize,
        collected: Collected,
    ) -> Result<Vec<Message>> {
        if collected.records.is_empty() && collected.bulks.is_empty() {
            return Ok(collected.messages);
        }
        if let Err(error) = self.commit() {
            self.index.add(slot, collected.count());
            let restored = collected
                .records
                .iter()
                .try_for_each(|(key, value)| self.backend.insert_message(key, value).map(drop))
                .and_then(|()| {
                    collected
                        .bulks
                        .iter()
                        .try_for_each(|(_, mark)| self.backend.remove_message(mark))
                });
            if let Err(restore) = restored {
                tracing::error!(%restore, "could not put back messages after a failed drain");
            }
            return Err(error);
        }
        for (bulk, mark) in &collected.bulks {
            if !bulk.note_taken(user) {
                // Reaped meanwhile. A bulk send's mark tells the reaper
                // that this drain took it off the index: the reaper
                // removes it. An announcement's is not needed any more.
                if bulk.everyone
                    && let Err(error) = self.backend.remove_message(mark)
                {
                    tracing::warn!(%error, "could not remove the mark of a reaped announcement; it is removed at the next open");
                }
            } else if bulk.due() {
                self.maintenance.fold(bulk.id);
            }
        }
        // After the records: a crash in between leaves entries without a
        // record, dropped when due.
        for entry in &collected.expiries {
            if let Err(error) = self.backend.remove_expiry(entry) {
                tracing::warn!(%error, "could not remove an expiry entry; it is dropped when due");
                break;
            }
        }
        self.release_shared(&collected.shared);
        Ok(collected.messages)
    }

    /// Ends lease `number`'s hold on its keys (those not taken over by a
    /// later lease after its deadline).
    fn unlease(&self, collected: &Collected, number: u64) {
        let mut leased = self.leased.lock();
        for key in collected.lease_keys() {
            if leased.get(key).is_some_and(|(owner, _)| *owner == number) {
                leased.remove(key);
            }
        }
        self.leased_count.store(leased.len(), Ordering::Release);
    }

    /// Rebuilds the in-memory state from disk after open: the index, the
    /// shared texts' recipient counts; rolls back unfinished bulk sends and
    /// quarantines damaged records.
    fn recover(&self) -> Result<()> {
        #[derive(Clone, Copy, PartialEq, Eq)]
        enum TextState {
            /// With its expiry time.
            Present(Option<u64>),
            Missing,
            Damaged,
        }
        let mut texts: HashMap<u64, TextState> = HashMap::new();
        let mut refs: HashMap<u64, u64> = HashMap::new();
        let mut orphans = 0_u64;
        let mut damaged = Vec::new();
        let mut records = 0_u64;
        let mut unreadable = 0_u64;
        let mut seen = RecordCounts::default();
        let mut damaged_bulks = Vec::new();
        for item in self.backend.all_bulks() {
            let (key, value) = item?;
            seen.bulk += 1;
            let decoded = key::split_text_key(&key)
                .ok_or_else(|| "the key is not a bulk id".to_owned())
                .and_then(|id| record::decode_bulk(&value).map(|bulk| (id, bulk)));
            match decoded {
                Ok((id, bulk)) => {
                    // Counted as queued for every listed user; marks found
                    // below take their user off again. Announcements are
                    // not counted.
                    if !bulk.everyone {
                        self.count_recipients(&bulk.recipients, true);
                    }
                    self.bulks.push(Arc::new(Bulk::new(
                        id,
                        bulk.message,
                        bulk.everyone,
                        bulk.recipients,
                    )));
                }
                Err(reason) => damaged_bulks.push((key, value, reason)),
            }
        }
        let mut stale_marks = Vec::new();
        let mut redo = Vec::new();
        // Records that expire, whose `expiry` entry should be there.
        let mut expiring: Vec<(u64, Bytes)> = Vec::new();
        for item in self.backend.all_messages() {
            let (key, value) = item?;
            seen.messages += 1;
            let Some((prefix, seq)) = key::split_key(&key) else {
                damaged.push((
                    key,
                    value,
                    "the key is not a user and a sequence number".to_owned(),
                ));
                continue;
            };
            let slot = self.index.slot(prefix);
            match record::decode_record(&value) {
                // Left in place: reading that user reports it as
                // `Error::Corrupt` once and moves it to quarantine.
                Err(_) => {
                    unreadable += 1;
                    self.index.add(slot, 1);
                }
                Ok(Record::Inline(message)) => {
                    records += 1;
                    self.index.add(slot, 1);
                    if let Some(at) = message.expires_at_ms {
                        expiring.push((at, key.clone()));
                    }
                }
                Ok(Record::Taken { removed }) => {
                    // A drain whose mark is on disk happened: finish its removals.
                    for seq in removed {
                        redo.push((key::message_key(prefix, seq), slot));
                    }
                    let live = self.bulks.get(seq).filter(|bulk| {
                        key::decode_user(prefix).is_some_and(|user| {
                            let listed = bulk.lists(&user);
                            if listed {
                                bulk.note_taken(&user);
                            }
                            listed
                        })
                    });
                    if let Some(bulk) = live {
                        if !bulk.everyone {
                            self.index.sub(slot, 1);
                        }
                    } else {
                        // Its bulk record is gone or no longer lists the
                        // user (a fold cut short): not needed any more.
                        stale_marks.push(key);
                    }
                }
                Ok(Record::Shared) => {
                    let state = match texts.get(&seq) {
                        Some(state) => *state,
                        None => {
                            let state = match self.backend.get_text(seq)? {
                                None => TextState::Missing,
                                Some(bytes) => match record::decode_text(&bytes) {
                                    Ok(text) => TextState::Present(text.expires_at_ms),
                                    Err(_) => TextState::Damaged,
                                },
                            };
                            texts.insert(seq, state);
                            state
                        }
                    };
                    if state == TextState::Missing {
                        self.backend.remove_message(&key)?;
                        orphans += 1;
                    } else {
                        match state {
                            TextState::Present(expires) => {
                                records += 1;
                                if let Some(at) = expires {
                                    expiring.push((at, key.clone()));
                                }
                            }
                            _ => unreadable += 1,
                        }
                        *refs.entry(seq).or_default() += 1;
                        self.index.add(slot, 1);
                    }
                }
            }
        }
        let rolled_back = orphans;
        for (key, value, reason) in &damaged_bulks {
            self.backend.quarantine("bulk", key, value, reason)?;
        }
        for (key, value, reason) in &damaged {
            self.backend.quarantine("messages", key, value, reason)?;
        }
        let mut unused_texts = 0_u64;
        for item in self.backend.all_texts() {
            let (key, value) = item?;
            seen.texts += 1;
            match key::split_text_key(&key) {
                Some(id) if refs.contains_key(&id) => {}
                Some(_) if record::decode_text(&value).is_err() => {
                    self.backend.quarantine(
                        "texts",
                        &key,
                        &value,
                        "the shared text does not decode",
                    )?;
                }
                Some(_) => {
                    unused_texts += 1;
                    self.backend.remove_text(&key)?;
                }
                None => {
                    self.backend
                        .quarantine("texts", &key, &value, "the key is not a text id")?
                }
            }
        }
        // sled treats a damaged stretch of its log like the torn end of a
        // crash and silently drops it and everything after it. Only a count
        // kept outside sled shows that: compare with the last clean close.
        if let Some(closed) = self.backend.read_clean_mark()? {
            if seen.messages < closed.messages
                || seen.texts < closed.texts
                || seen.bulk < closed.bulk
            {
                return Err(Error::DataLoss {
                    path: self.backend.path().to_path_buf(),
                    expected: closed.messages + closed.texts + closed.bulk,
                    found: seen.messages + seen.texts + seen.bulk,
                    mark: self.backend.clean_mark_path(),
                });
            }
            self.backend.remove_clean_mark()?;
        }
        *self.refs.lock() = refs;
        // Only now that the store passed the check above: finish the
        // removals of drains that committed, drop marks no longer needed, and
        // fold what is due.
        let mut finished = 0_u64;
        for (key, slot) in &redo {
            if self.backend.take_message(key)? {
                self.index.sub(*slot, 1);
                finished += 1;
            }
        }
        if finished > 0 {
            tracing::warn!(
                finished,
                "finished the removals of drains cut off by a crash after they committed"
            );
        }
        self.backend.remove_messages(&stale_marks)?;
        // Entries are written before their record, so none should be
        // missing; if one is, the record would never be reaped.
        let finished_keys: HashSet<&[u8]> = redo.iter().map(|(key, _)| key.as_slice()).collect();
        let mut restored = 0_u64;
        for (at, key) in expiring
            .iter()
            .filter(|(_, key)| !finished_keys.contains(key.as_ref()))
        {
            if self.backend.ensure_expiry(*at, key)? {
                restored += 1;
            }
        }
        if restored > 0 {
            tracing::warn!(restored, "restored missing expiry entries");
        }
        for bulk in self.bulks.snapshot().iter() {
            if bulk.due() {
                self.maintenance.fold(bulk.id);
            }
        }
        if rolled_back + damaged.len() as u64 + unused_texts + unreadable > 0
            || !damaged_bulks.is_empty()
        {
            tracing::warn!(
                path = %self.backend.path().display(),
                rolled_back,
                quarantined = damaged.len(),
                quarantined_bulk_sends = damaged_bulks.len(),
                unreadable,
                unused_texts,
                "recovered the message store; unreadable records are reported and quarantined when their user is read"
            );
        }
        tracing::debug!(records, "opened the message store");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The reaper's races with drains and leases, played in a fixed order.

    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::clock::ManualClock;
    use crate::live::Notifier;

    const HOUR_MS: u64 = 3_600_000;

    /// A store with one index slot, so that `may_have` shows the total count.
    fn open(dir: &Path, clock: &ManualClock) -> SledEngine {
        SledEngine::open(SledOptions {
            path: dir.to_path_buf(),
            durability: Durability::Periodic(Duration::from_millis(100)),
            cache_bytes: 16 << 20,
            lock_timeout: Duration::from_secs(5),
            index_slots: 1,
            disk_reserve: 0,
            skip_fdatasync: true,
            intake_pause: Duration::ZERO,
            common: Common {
                lease_timeout: Duration::from_secs(60),
                rules: Rules::default(),
                clock: Arc::new(clock.clone()),
                notifier: Arc::new(Notifier::default()),
            },
        })
        .expect("open")
    }

    fn message(text: &str, expires_at_ms: Option<u64>) -> Outgoing {
        Outgoing {
            text: text.to_owned(),
            level: crate::Level::Info,
            sent_at_ms: 0,
            expires_at_ms,
            replace_key: None,
        }
    }

    /// An anchor message and a bulk send to 300 users that expires in an
    /// hour; the clock is then past its expiry.
    fn setup(engine: &SledEngine, clock: &ManualClock) -> Arc<Bulk> {
        let now = crate::clock::now_ms(clock);
        engine
            .send(&UserId::Int(1_000), &message("anchor", None))
            .expect("send");
        let mut users = Recipients::default();
        for user in 0..300 {
            users.push(UserId::Int(user));
        }
        engine
            .send_bulk(users, &message("bulk", Some(now + HOUR_MS)))
            .expect("bulk send");
        engine.inner.bulks.snapshot()[0].clone()
    }

    /// Only the anchor is counted: the index is exact.
    fn assert_exact(engine: &SledEngine) {
        let anchor = UserId::Int(1_000);
        assert!(engine.may_have(&anchor), "the index under-counts");
        assert_eq!(engine.drain(&anchor).expect("drain").len(), 1);
        assert!(!engine.may_have(&anchor), "the index over-counts");
    }

    #[test]
    fn a_lease_committed_between_retiring_and_settling_is_counted_once() {
        let dir = tempfile::tempdir().expect("dir");
        let clock = ManualClock::new();
        let engine = open(dir.path(), &clock);
        let bulk = setup(&engine, &clock);
        let lease = engine.lease(&UserId::Int(5)).expect("lease");
        assert_eq!(lease.messages().len(), 1);
        clock.advance(Duration::from_millis(HOUR_MS));
        let inner = &engine.inner;
        assert!(inner.retire_bulk(&bulk).expect("retire"));
        assert_eq!(lease.commit().expect("commit").len(), 1);
        inner
            .settle_recipients(&bulk, &AtomicBool::new(false))
            .expect("settle");
        inner.settle_deferred().expect("deferred");
        assert!(inner.deferred.lock().is_empty());
        assert_exact(&engine);
    }

    #[test]
    fn a_lease_held_while_settling_is_settled_when_it_ends() {
        for commit in [true, false] {
            let dir = tempfile::tempdir().expect("dir");
            let clock = ManualClock::new();
            let engine = open(dir.path(), &clock);
            let bulk = setup(&engine, &clock);
            let lease = engine.lease(&UserId::Int(5)).expect("lease");
            clock.advance(Duration::from_millis(HOUR_MS));
            let inner = &engine.inner;
            assert!(inner.retire_bulk(&bulk).expect("retire"));
            inner
                .settle_recipients(&bulk, &AtomicBool::new(false))
                .expect("settle");
            assert_eq!(inner.deferred.lock().len(), 1, "user 5 waits");
            inner.settle_deferred().expect("deferred");
            assert_eq!(inner.deferred.lock().len(), 1, "still leased");
            if commit {
                assert_eq!(lease.commit().expect("commit").len(), 1);
            } else {
                lease.release();
            }
            inner.settle_deferred().expect("deferred");
            assert!(inner.deferred.lock().is_empty());
            assert_exact(&engine);
            let mark =
                key::message_key(&key::user_prefix(&UserId::Int(5)).expect("prefix"), bulk.id);
            assert!(
                inner.backend.get_message(&mark).expect("get").is_none(),
                "the mark is gone"
            );
        }
    }
}
