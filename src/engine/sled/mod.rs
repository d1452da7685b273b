//! The sled engine: the embedded default. One process opens the store's
//! directory; every other rule is in the crate docs' `# Design` section.
//!
//! - `backend.rs` is the only file that touches sled (its trees, flushes,
//!   the clean-close mark);
//! - `bulk.rs` keeps large bulk sends as one record each;
//! - `commit.rs` shares one fsync between concurrent writers;
//! - `index.rs` answers "does this user have messages?" from memory.

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
use super::{Common, EmptyLease, Engine, LeaseState, Outgoing, Rules};
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
            backend,
            _registration: registration,
        };
        inner.recover()?;
        let dirs = crate::spool::Dirs::of(&path);
        dirs.create()?;
        inner.take_in(&dirs)?;
        let inner = Arc::new(inner);
        Ok(SledEngine {
            _intake: intake::Intake::start(Arc::downgrade(&inner), dirs)?,
            inner,
        })
    }
}

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
    /// Large bulk sends among them, and the keys of the taken marks a drain writes.
    bulks: Vec<(Arc<Bulk>, Vec<u8>)>,
}

impl Collected {
    /// Records and bulk messages: what the index counted.
    fn count(&self) -> u32 {
        u32::try_from(self.records.len() + self.bulks.len()).unwrap_or(u32::MAX)
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
        if let Err(error) = inner.insert_locked(slot, &key, &value) {
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
        let written = inner.write_recipients(id, users, progress);
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
        Ok(BulkSend {
            id: Some(MessageId(id)),
            recipients,
        })
    }

    fn send_bulk(&self, users: Recipients, message: &Outgoing) -> Result<BulkSend> {
        self.inner.send_bulk_record(users, message)
    }

    fn send_everyone(&self, _message: &Outgoing) -> Result<MessageId> {
        Err(Error::Storage {
            path: self.inner.backend.path().to_path_buf(),
            source: "announcements are not written on sled yet".into(),
        })
    }

    fn drain(&self, user: &UserId) -> Result<Vec<Message>> {
        let inner = &self.inner;
        let prefix = key::user_prefix(user)?;
        let slot = inner.index.slot(&prefix);
        if inner.index.is_empty(slot) {
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
        key::user_prefix(user)
            .is_ok_and(|prefix| !self.inner.index.is_empty(self.inner.index.slot(&prefix)))
    }

    fn peek(&self, user: &UserId) -> Result<Vec<Message>> {
        let inner = &self.inner;
        let prefix = key::user_prefix(user)?;
        let slot = inner.index.slot(&prefix);
        if inner.index.is_empty(slot) {
            return Ok(Vec::new());
        }
        let _scan = inner.stripe(slot).lock();
        Ok(inner.collect(user, &prefix, slot, false)?.messages)
    }

    fn lease(&self, user: &UserId) -> Result<Box<dyn LeaseState>> {
        let inner = &self.inner;
        let prefix = key::user_prefix(user)?;
        let slot = inner.index.slot(&prefix);
        if inner.index.is_empty(slot) {
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
        for bulk in self.inner.bulks.snapshot().iter() {
            users.extend(bulk.recipients().users());
        }
        Ok(users.into_iter().collect())
    }

    fn bulk_records(&self) -> Result<u64> {
        Ok(self.inner.bulks.snapshot().len() as u64)
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
        removed?;
        inner.finish_removal(&self.user, self.slot, collected)
    }

    fn release(mut self: Box<Self>) {
        if let Some(collected) = self.collected.take() {
            self.inner.unlease(&collected, self.number);
        }
    }
}

impl Drop for SledLease {
    fn drop(&mut self) {
        if let Some(collected) = self.collected.take() {
            self.inner.unlease(&collected, self.number);
        }
    }
}

impl Inner {
    fn stripe(&self, slot: usize) -> &Mutex<()> {
        &self.stripes[slot % STRIPES]
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
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64> {
        let value = record::encode_shared();
        let mut key = Vec::with_capacity(64);
        let mut written = 0_u64;
        for user in users {
            key::write_message_key(&mut key, user, id)?;
            let slot = self.index.slot(&key[..key.len() - key::SEQ_LEN]);
            self.index.add(slot, 1);
            match self.insert_locked(slot, &key, &value) {
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
            collected.messages.push(message);
            collected.records.push((key, value));
        }
        // After the scan, under the user's stripe: a bulk send that
        // committed before any record the scan saw is in this list.
        let bulks = self.bulks.snapshot();
        if !bulks.is_empty() {
            for bulk in bulks.iter() {
                if taken.contains(&bulk.id) || !bulk.lists(user) {
                    continue;
                }
                let mark = key::message_key(prefix, bulk.id);
                if any_leased && is_leased(&mark) {
                    continue;
                }
                collected.messages.push(bulk.message.message(bulk.id));
                collected.bulks.push((bulk.clone(), mark));
            }
            if !collected.bulks.is_empty() {
                collected.messages.sort_by_key(|m| m.id);
            }
        }
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
        for (bulk, _) in &collected.bulks {
            bulk.note_taken(user);
            if bulk.due() {
                self.maintenance.fold(bulk.id);
            }
        }
        let mut unused = Vec::new();
        {
            let mut refs = self.refs.lock();
            for id in &collected.shared {
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
            Present,
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
                    // below take their user off again.
                    self.count_recipients(&bulk.recipients, true);
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
                Ok(Record::Inline { .. }) => {
                    records += 1;
                    self.index.add(slot, 1);
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
                    if live.is_some() {
                        self.index.sub(slot, 1);
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
                                    Ok(_) => TextState::Present,
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
                        if state == TextState::Damaged {
                            unreadable += 1;
                        } else {
                            records += 1;
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
