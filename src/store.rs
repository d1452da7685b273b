//! The message store: sending, draining, leasing.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use parking_lot::Mutex;

use crate::backend::{Backend, Bytes, OpenOptions, QuarantinedRecord, RecordCounts};
use crate::bulk::{Bulk, BulkList, Maintenance, Recipients};
use crate::commit::GroupCommit;
use crate::index::PendingIndex;
use crate::message::{BulkSend, MessageId, Progress, now_ms};
use crate::record::{self, Record};
use crate::{Error, Level, Message, Result, UserId, key};

/// When a write reaches the disk. See the crate docs' `# Design` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Every send and every drain returns only after it is on disk (sled's
    /// flush, then `fdatasync` of its log file).
    /// Concurrent callers share one fsync (group commit), so many threads
    /// sending at once cost little more than one. After a crash or power
    /// loss nothing acknowledged is lost and no drained message comes back.
    /// The default.
    #[default]
    Immediate,
    /// sled writes to the disk in the background, at least this often. If
    /// the process is killed, a send or drain acknowledged less than this
    /// long before can be lost (a send) or come back (a drain). sled's
    /// background write does not flush the drive's cache, so on a power loss
    /// everything since the last [`MessageStore::flush`] (which does) is at risk.
    Periodic(Duration),
}

/// Settings for opening a [`MessageStore`]; made by [`MessageStore::builder`].
#[derive(Debug, Clone)]
#[must_use = "call .open() to open the store"]
pub struct Builder {
    path: Option<PathBuf>,
    min_level: Level,
    max_message_bytes: usize,
    durability: Durability,
    cache_bytes: u64,
    lock_timeout: Duration,
    index_slots: usize,
    disk_reserve: u64,
    skip_fdatasync: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            path: None,
            min_level: Level::Info,
            max_message_bytes: MessageStore::DEFAULT_MAX_MESSAGE_BYTES,
            durability: Durability::Immediate,
            cache_bytes: 8 << 20,
            lock_timeout: Duration::from_secs(2),
            index_slots: 1 << 20,
            disk_reserve: 8 << 20,
            skip_fdatasync: false,
        }
    }
}

impl Builder {
    /// The directory holding the store; created if missing. Required.
    pub fn path(mut self, path: impl AsRef<Path>) -> Self {
        self.path = Some(path.as_ref().to_path_buf());
        self
    }

    /// Messages below this level are not stored (the send returns `Ok(None)`),
    /// as in Django. Default: [`Level::Info`], so [`Level::Debug`] is dropped.
    pub fn min_level(mut self, level: Level) -> Self {
        self.min_level = level;
        self
    }

    /// The largest message text accepted, in bytes; larger ones are refused
    /// with [`Error::MessageTooLarge`] and nothing is stored.
    /// Default: 64 KiB. At most 16 MiB (larger values are lowered to that).
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes.min(MessageStore::MAX_MESSAGE_BYTES_LIMIT);
        self
    }

    /// When writes reach the disk. Default: [`Durability::Immediate`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Memory for sled's page cache, in bytes. Default: 8 MiB. (sled's
    /// memory use grows beyond this with the number of stored records; see
    /// README's performance section.)
    pub fn cache_bytes(mut self, bytes: u64) -> Self {
        self.cache_bytes = bytes;
        self
    }

    /// How long `open` retries when the store's lock is held. A handle
    /// dropped a moment ago can hold it for a few milliseconds while its
    /// background threads stop; a store open in another process holds it
    /// until that process closes it, and `open` then fails with
    /// [`Error::AlreadyOpen`]. A store open in this process is refused at once.
    /// Default: 2 seconds.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Counters in the in-memory index that answers "does this user have
    /// messages?" without touching the disk (4 bytes each; rounded up to a
    /// power of two). More slots, fewer false "maybe"s when many users have
    /// messages queued. Default: 1,048,576 (4 MiB).
    pub fn index_slots(mut self, slots: usize) -> Self {
        self.index_slots = slots;
        self
    }

    /// Free disk space, in bytes, below which sends are refused with
    /// [`Error::DiskFull`] (nothing is stored). sled cannot recover from
    /// running out of space while open, so the store stops short of it and
    /// works again as soon as space is freed. Drains are always allowed.
    /// `0` turns the check off. Default: 8 MiB.
    pub fn disk_reserve(mut self, bytes: u64) -> Self {
        self.disk_reserve = bytes;
        self
    }

    /// For tests only: `true` leaves out the `fdatasync` of sled's log
    /// after each flush, which breaks the power-loss promise of
    /// [`Durability::Immediate`]. `tests/power_loss.rs` uses it to show that
    /// its check catches a store that does not sync. Default: `false`.
    #[doc(hidden)]
    pub fn unsafe_skip_fdatasync_for_tests(mut self, skip: bool) -> Self {
        self.skip_fdatasync = skip;
        self
    }

    /// Opens the store, creating it if needed, and recovers from any crash:
    /// a bulk send that did not finish is rolled back, and records whose key
    /// is damaged are moved to quarantine (see [`MessageStore::quarantined`]).
    /// A record whose value is damaged stays until its user is read, which
    /// reports it as [`Error::Corrupt`] and moves it to quarantine.
    ///
    /// # Errors
    /// [`Error::NoPath`] without a path; [`Error::NotADirectory`] if the path is
    /// a file; [`Error::AlreadyOpen`] if the store is open elsewhere;
    /// [`Error::PermissionDenied`]; [`Error::UnsupportedFormat`] for a store
    /// written by a newer release; [`Error::Storage`] for other failures.
    pub fn open(self) -> Result<MessageStore> {
        let path = self.path.clone().ok_or(Error::NoPath)?;
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
        std::fs::create_dir_all(&path).map_err(|e| crate::backend::io_error(&path, e))?;
        for dir in &created {
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
            crate::backend::sync_dir(parent.unwrap_or(Path::new(".")))?;
        }
        let canonical =
            std::fs::canonicalize(&path).map_err(|e| crate::backend::io_error(&path, e))?;
        let registration = Registration::new(canonical)
            .ok_or_else(|| Error::AlreadyOpen { path: path.clone() })?;
        let backend = Backend::open(&OpenOptions {
            path: &path,
            cache_bytes: self.cache_bytes,
            flush_every: match self.durability {
                Durability::Immediate => Some(Duration::from_millis(500)),
                Durability::Periodic(every) => Some(every),
            },
            lock_timeout: self.lock_timeout,
            disk_reserve: self.disk_reserve,
            skip_fdatasync: self.skip_fdatasync,
        })?;
        let commit = match self.durability {
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
            index: PendingIndex::new(self.index_slots),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            leased: Mutex::new(HashSet::new()),
            leased_count: AtomicUsize::new(0),
            inflight: Mutex::new(HashSet::new()),
            refs: Mutex::new(HashMap::new()),
            min_level: self.min_level,
            max_message_bytes: self.max_message_bytes,
            backend,
            _registration: registration,
        };
        inner.recover()?;
        Ok(MessageStore {
            inner: Arc::new(inner),
        })
    }
}

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

/// Lock stripes: a drain holds its user's stripe while it scans and removes,
/// an insert while it inserts, so a drain sees each sender's messages as a prefix.
const STRIPES: usize = 1024;
/// A bulk send reports progress every this many recipients.
const BULK_CHUNK: u64 = 8192;

/// A persistent queue of messages for users. Cheap to clone (one `Arc`);
/// share it between threads. See the [crate docs](crate) for an example.
#[derive(Clone)]
pub struct MessageStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MessageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageStore")
            .field("path", &self.inner.backend.path())
            .field("min_level", &self.inner.min_level)
            .field("max_message_bytes", &self.inner.max_message_bytes)
            .finish_non_exhaustive()
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
    /// Keys currently leased: hidden from drains until committed or released.
    leased: Mutex<HashSet<Bytes>>,
    leased_count: AtomicUsize,
    /// Bulk sends being written: their records are not visible yet.
    inflight: Mutex<HashSet<u64>>,
    /// Live recipients of each shared text; at zero the text is removed.
    refs: Mutex<HashMap<u64, u64>>,
    min_level: Level,
    max_message_bytes: usize,
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

impl MessageStore {
    /// The default for [`Builder::max_message_bytes`]: 64 KiB.
    pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 10;
    /// The largest value [`Builder::max_message_bytes`] accepts: 16 MiB.
    pub const MAX_MESSAGE_BYTES_LIMIT: usize = 16 << 20;

    /// Opens the store at `path` with the default settings; the same as
    /// `MessageStore::builder().path(path).open()`.
    ///
    /// # Errors
    /// As for [`Builder::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<MessageStore> {
        MessageStore::builder().path(path).open()
    }

    /// Settings for opening a store, each with its default.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The store's directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        self.inner.backend.path()
    }

    /// Queues `text` for `user`. Returns the message's id, or `None` when
    /// `level` is below the store's minimum level (nothing is stored).
    ///
    /// # Errors
    /// [`Error::MessageTooLarge`], [`Error::EmptyMessage`] and
    /// [`Error::UserIdTooLong`] before anything is written; a storage error
    /// (such as [`Error::DiskFull`]) if the write fails, in which case the
    /// message is not queued. One exception: if the disk itself fails while
    /// making the message durable, the handle is poisoned (every later call
    /// fails until the process restarts) and the message may or may not be
    /// there after the restart.
    pub fn message_user(
        &self,
        user: impl Into<UserId>,
        text: impl Into<String>,
        level: Level,
    ) -> Result<Option<MessageId>> {
        let text = text.into();
        self.check_text(&text)?;
        let prefix = key::user_prefix(&user.into())?;
        if level < self.inner.min_level {
            return Ok(None);
        }
        let inner = &self.inner;
        inner.backend.check_space()?;
        let id = inner.backend.next_id()?;
        let key = key::message_key(&prefix, id);
        let slot = inner.index.slot(&prefix);
        inner.index.add(slot, 1);
        let value = record::encode_inline(level, now_ms(), &text);
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
        Ok(Some(MessageId(id)))
    }

    /// Queues one message for every user in `users`, all or nothing: if any
    /// user id is invalid or a write fails, no user gets the message. The
    /// message is stored once, however many users there are: above 256
    /// users as one record holding the text and the recipient set (a
    /// roaring bitmap for integer ids, about 2 bytes each or less, and the
    /// string ids), so a send to a million users takes milliseconds and
    /// writes one record. A user listed twice gets the message once. Each
    /// user then takes it on their next drain, in send order with their
    /// other messages; the record is removed once every recipient has.
    ///
    /// # Errors
    /// As for [`message_user`](Self::message_user); the text is checked
    /// before anything is written.
    pub fn message_users<U: Into<UserId>>(
        &self,
        users: impl IntoIterator<Item = U>,
        text: impl Into<String>,
        level: Level,
    ) -> Result<BulkSend> {
        self.message_users_with_progress(users, text, level, |_| {})
    }

    /// [`message_users`](Self::message_users), calling `progress` after each
    /// chunk of recipients is written and once more when the send commits,
    /// for a progress bar.
    ///
    /// # Errors
    /// As for [`message_users`](Self::message_users).
    pub fn message_users_with_progress<U: Into<UserId>>(
        &self,
        users: impl IntoIterator<Item = U>,
        text: impl Into<String>,
        level: Level,
        mut progress: impl FnMut(Progress),
    ) -> Result<BulkSend> {
        let text = text.into();
        self.check_text(&text)?;
        if level < self.inner.min_level {
            return Ok(BulkSend {
                id: None,
                recipients: 0,
            });
        }
        // Up to the threshold, a record per recipient; above it, one record.
        let mut users = users.into_iter().map(Into::into);
        let first: Vec<UserId> = users.by_ref().take(crate::bulk::THRESHOLD + 1).collect();
        if first.len() > crate::bulk::THRESHOLD {
            return self.inner.send_bulk_record(
                first.into_iter().chain(users),
                text,
                level,
                progress,
            );
        }
        let inner = &self.inner;
        inner.backend.check_space()?;
        let id = inner.backend.next_id()?;
        inner.inflight.lock().insert(id);
        let written = inner.write_recipients(id, first, &mut progress);
        let result = written.and_then(|recipients| {
            if recipients == 0 {
                return Ok(0);
            }
            inner.refs.lock().insert(id, recipients);
            // The commit point: recipients' records are visible from here on.
            let committed = inner
                .backend
                .insert_text(id, &record::encode_text(level, now_ms(), &text));
            committed.map(|()| recipients)
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
            return Ok(BulkSend {
                id: None,
                recipients: 0,
            });
        }
        if let Err(error) = inner.commit() {
            // Un-commit: without its text the records are orphans.
            let _ = inner.backend.remove_text(&key::text_key(id));
            inner.refs.lock().remove(&id);
            return Err(error);
        }
        progress(Progress {
            written: recipients,
            committed: true,
        });
        Ok(BulkSend {
            id: Some(MessageId(id)),
            recipients,
        })
    }

    /// Queues a [`Level::Debug`] message (dropped unless the minimum level is lowered).
    ///
    /// # Errors
    /// As for [`message_user`](Self::message_user).
    pub fn debug(
        &self,
        user: impl Into<UserId>,
        text: impl Into<String>,
    ) -> Result<Option<MessageId>> {
        self.message_user(user, text, Level::Debug)
    }

    /// Queues a [`Level::Info`] message.
    ///
    /// # Errors
    /// As for [`message_user`](Self::message_user).
    pub fn info(
        &self,
        user: impl Into<UserId>,
        text: impl Into<String>,
    ) -> Result<Option<MessageId>> {
        self.message_user(user, text, Level::Info)
    }

    /// Queues a [`Level::Success`] message.
    ///
    /// # Errors
    /// As for [`message_user`](Self::message_user).
    pub fn success(
        &self,
        user: impl Into<UserId>,
        text: impl Into<String>,
    ) -> Result<Option<MessageId>> {
        self.message_user(user, text, Level::Success)
    }

    /// Queues a [`Level::Warning`] message.
    ///
    /// # Errors
    /// As for [`message_user`](Self::message_user).
    pub fn warning(
        &self,
        user: impl Into<UserId>,
        text: impl Into<String>,
    ) -> Result<Option<MessageId>> {
        self.message_user(user, text, Level::Warning)
    }

    /// Queues a [`Level::Error`] message.
    ///
    /// # Errors
    /// As for [`message_user`](Self::message_user).
    pub fn error(
        &self,
        user: impl Into<UserId>,
        text: impl Into<String>,
    ) -> Result<Option<MessageId>> {
        self.message_user(user, text, Level::Error)
    }

    /// Returns `user`'s queued messages in send order and removes them,
    /// atomically: each message is returned by exactly one call, however many
    /// threads send and drain at once. Leased messages (see
    /// [`lease_messages`](Self::lease_messages)) are skipped. An empty queue is
    /// answered from memory, without touching the disk.
    ///
    /// With [`Durability::Immediate`] the removal is on disk before this returns,
    /// so a drained message never comes back after a crash.
    ///
    /// # Errors
    /// [`Error::Corrupt`] if one of the user's records is damaged: it is moved
    /// to quarantine, nothing is removed, and the next call returns the rest.
    /// A storage error if the removal fails; the messages then stay queued.
    pub fn get_messages(&self, user: impl Into<UserId>) -> Result<Vec<Message>> {
        let user = user.into();
        let prefix = key::user_prefix(&user)?;
        let inner = &self.inner;
        let slot = inner.index.slot(&prefix);
        if inner.index.is_empty(slot) {
            return Ok(Vec::new());
        }
        let collected = {
            let _drain = inner.stripe(slot).lock();
            let collected = inner.collect(&user, &prefix, slot, true)?;
            inner.remove(slot, &collected)?;
            collected
        };
        inner.finish_removal(&user, slot, collected)
    }

    /// `false` when `user` certainly has nothing queued. Answered from
    /// memory without touching the disk or taking a lock (`true` may be a
    /// false alarm: another user shares the index slot).
    #[must_use]
    pub fn may_have_messages(&self, user: impl Into<UserId>) -> bool {
        key::user_prefix(&user.into())
            .is_ok_and(|prefix| !self.inner.index.is_empty(self.inner.index.slot(&prefix)))
    }

    /// Returns `user`'s queued messages in send order without removing them.
    ///
    /// # Errors
    /// As for [`get_messages`](Self::get_messages).
    pub fn peek(&self, user: impl Into<UserId>) -> Result<Vec<Message>> {
        let user = user.into();
        let prefix = key::user_prefix(&user)?;
        let slot = self.inner.index.slot(&prefix);
        if self.inner.index.is_empty(slot) {
            return Ok(Vec::new());
        }
        let _scan = self.inner.stripe(slot).lock();
        Ok(self.inner.collect(&user, &prefix, slot, false)?.messages)
    }

    /// How many messages `user` has queued (leased ones included).
    ///
    /// # Errors
    /// As for [`get_messages`](Self::get_messages).
    pub fn count(&self, user: impl Into<UserId>) -> Result<usize> {
        self.peek(user).map(|messages| messages.len())
    }

    /// Takes `user`'s queued messages without removing them yet: they are
    /// hidden from other drains and leases until the [`Lease`] is committed
    /// (removed for good) or released (back in the queue). If the lease is
    /// dropped, or the process dies, they come back. This gives at-least-once
    /// delivery: use it when a message must survive a page that fails to render.
    ///
    /// # Errors
    /// As for [`get_messages`](Self::get_messages).
    pub fn lease_messages(&self, user: impl Into<UserId>) -> Result<Lease> {
        let user = user.into();
        let prefix = key::user_prefix(&user)?;
        let inner = &self.inner;
        let slot = inner.index.slot(&prefix);
        let collected = if inner.index.is_empty(slot) {
            Collected::default()
        } else {
            let _drain = inner.stripe(slot).lock();
            let collected = inner.collect(&user, &prefix, slot, true)?;
            let mut leased = inner.leased.lock();
            for key in collected.lease_keys() {
                leased.insert(Bytes::from(key));
            }
            inner.leased_count.store(leased.len(), Ordering::Release);
            collected
        };
        Ok(Lease {
            store: self.clone(),
            user,
            slot,
            collected: Some(collected),
        })
    }

    /// Makes every write so far durable, also against a power loss (sled's
    /// flush, then `fdatasync`). Only needed with [`Durability::Periodic`].
    ///
    /// # Errors
    /// A storage error if the disk write fails.
    pub fn flush(&self) -> Result<()> {
        self.inner.backend.flush()
    }

    /// The store's size on disk, in bytes.
    ///
    /// # Errors
    /// A storage error if the files cannot be read.
    pub fn size_on_disk(&self) -> Result<u64> {
        self.inner.backend.size_on_disk()
    }

    /// The damaged records found so far (at open or when read), which were
    /// moved aside so that they cannot block their user's queue.
    ///
    /// # Errors
    /// A storage error if the quarantine cannot be read.
    pub fn quarantined(&self) -> Result<Vec<QuarantinedRecord>> {
        self.inner.backend.quarantined()
    }

    fn check_text(&self, text: &str) -> Result<()> {
        if text.is_empty() {
            return Err(Error::EmptyMessage);
        }
        if text.len() > self.inner.max_message_bytes {
            return Err(Error::MessageTooLarge {
                size: text.len(),
                limit: self.inner.max_message_bytes,
            });
        }
        Ok(())
    }
}

/// Messages taken by [`MessageStore::lease_messages`], not yet removed.
///
/// [`commit`](Lease::commit) removes them; [`release`](Lease::release), or
/// dropping the lease, puts them back in the queue.
#[must_use = "a lease puts its messages back when dropped; call .commit() once they are shown"]
pub struct Lease {
    store: MessageStore,
    user: UserId,
    slot: usize,
    collected: Option<Collected>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("messages", &self.messages())
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// The leased messages, in send order.
    #[must_use]
    pub fn messages(&self) -> &[Message] {
        self.collected
            .as_ref()
            .map_or(&[], |collected| collected.messages.as_slice())
    }

    /// Removes the leased messages for good.
    ///
    /// # Errors
    /// A storage error if the removal fails; the messages then stay queued.
    pub fn commit(mut self) -> Result<Vec<Message>> {
        let Some(collected) = self.collected.take() else {
            return Ok(Vec::new());
        };
        let inner = &self.store.inner;
        let removed = {
            let _drain = inner.stripe(self.slot).lock();
            inner.remove(self.slot, &collected)
        };
        inner.unlease(&collected);
        removed?;
        inner.finish_removal(&self.user, self.slot, collected)
    }

    /// Puts the messages back in the queue (the same as dropping the lease).
    pub fn release(mut self) {
        if let Some(collected) = self.collected.take() {
            self.store.inner.unlease(&collected);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(collected) = self.collected.take() {
            self.store.inner.unlease(&collected);
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
    /// (see `bulk.rs`). The users are read into a compact set first (ids are
    /// checked before anything is written); the record then gets its
    /// sequence number and becomes visible under the bulk commit lock.
    fn send_bulk_record(
        &self,
        users: impl Iterator<Item = UserId>,
        text: String,
        level: Level,
        mut progress: impl FnMut(Progress),
    ) -> Result<BulkSend> {
        let mut set = Recipients::default();
        let mut read = 0_u64;
        for user in users {
            if let UserId::Str(name) = &user {
                key::str_id_len(name)?;
            }
            set.push(user);
            read += 1;
            if read.is_multiple_of(BULK_CHUNK) {
                progress(Progress {
                    written: read,
                    committed: false,
                });
            }
        }
        set.seal();
        self.backend.check_space()?;
        let sent_at_ms = now_ms();
        let value = record::encode_bulk(level, sent_at_ms, &text, &set);
        let recipients = set.len();
        let bulk = {
            let _commit = self.bulks.commit.lock();
            let id = self.backend.next_id()?;
            self.backend.insert_bulk(id, &value)?;
            // Counted before it becomes visible (the index's invariant).
            self.count_recipients(&set, true);
            let bulk = Arc::new(Bulk::new(id, level, sent_at_ms, text, set));
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
        progress(Progress {
            written: recipients,
            committed: true,
        });
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
    fn write_recipients<U: Into<UserId>>(
        &self,
        id: u64,
        users: impl IntoIterator<Item = U>,
        progress: &mut impl FnMut(Progress),
    ) -> Result<u64> {
        let value = record::encode_shared();
        let mut key = Vec::with_capacity(64);
        let mut written = 0_u64;
        for user in users {
            key::write_message_key(&mut key, &user.into(), id)?;
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
            if written.is_multiple_of(BULK_CHUNK) {
                self.backend.check_space()?;
                progress(Progress {
                    written,
                    committed: false,
                });
            }
        }
        if !written.is_multiple_of(BULK_CHUNK) {
            progress(Progress {
                written,
                committed: false,
            });
        }
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
        if any_leased {
            let leased = self.leased.lock();
            records.retain(|(key, _)| !leased.contains(key));
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
                Ok(Record::Inline {
                    level,
                    sent_at_ms,
                    text,
                }) => Message {
                    id: MessageId(seq),
                    level,
                    sent_at_ms,
                    text,
                },
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
                            Message {
                                id: MessageId(seq),
                                level: text.level,
                                sent_at_ms: text.sent_at_ms,
                                text: text.text,
                            }
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
                if any_leased && self.leased.lock().contains(mark.as_slice()) {
                    continue;
                }
                collected.messages.push(Message {
                    id: MessageId(bulk.id),
                    level: bulk.level,
                    sent_at_ms: bulk.sent_at_ms,
                    text: bulk.text.clone(),
                });
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

    fn unlease(&self, collected: &Collected) {
        let mut leased = self.leased.lock();
        for key in collected.lease_keys() {
            leased.remove(key);
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
                        bulk.level,
                        bulk.sent_at_ms,
                        bulk.text,
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
