//! The message store: sending, draining, leasing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::engine::memory::MemoryEngine;
use crate::engine::sled::{SledEngine, SledOptions};
use crate::engine::{Common, Engine, LeaseState, Outgoing, Rules};
use crate::live::{Notifier, Watch};
use crate::message::{BulkSend, MessageId, Progress};
use crate::recipients::{Recipients, THRESHOLD};
use crate::record::QuarantinedRecord;
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
    redis: Option<String>,
    namespace: String,
    in_memory: bool,
    lease_timeout: Duration,
    min_level: Level,
    max_message_bytes: usize,
    durability: Durability,
    cache_bytes: u64,
    lock_timeout: Duration,
    index_slots: usize,
    disk_reserve: u64,
    skip_fdatasync: bool,
    intake_pause: Duration,
    default_expiry: Option<Duration>,
    clock: Arc<dyn Clock>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            path: None,
            redis: None,
            namespace: MessageStore::DEFAULT_NAMESPACE.to_owned(),
            in_memory: false,
            lease_timeout: Duration::from_secs(60),
            min_level: Level::Info,
            max_message_bytes: MessageStore::DEFAULT_MAX_MESSAGE_BYTES,
            durability: Durability::Immediate,
            cache_bytes: 8 << 20,
            lock_timeout: Duration::from_secs(2),
            index_slots: 1 << 20,
            disk_reserve: 8 << 20,
            skip_fdatasync: false,
            intake_pause: Duration::ZERO,
            default_expiry: None,
            clock: Arc::new(SystemClock),
        }
    }
}

impl Builder {
    /// The directory holding the store, on sled (the embedded engine);
    /// created if missing. A store needs either this, [`redis`](Self::redis)
    /// or [`in_memory`](Self::in_memory).
    pub fn path(mut self, path: impl AsRef<Path>) -> Self {
        self.path = Some(path.as_ref().to_path_buf());
        self
    }

    /// Keeps the messages on a Redis server instead of on disk, so that
    /// several processes and servers share them (feature `redis`). `url`
    /// is `redis://[:password@]host[:port][/db]`, or `rediss://…` for TLS.
    /// See README's "Several servers" section for what each guarantee
    /// becomes on Redis.
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.redis = Some(url.into());
        self
    }

    /// On Redis, the prefix of every key this store writes, so that several
    /// apps can share one server. Default: `"async-messages"`. Ignored by
    /// the other engines.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Keeps the messages in this process's memory: nothing survives the
    /// handle. For tests of code that sends messages; see
    /// [`MessageStore::in_memory`].
    pub fn in_memory(mut self) -> Self {
        self.in_memory = true;
        self
    }

    /// How long a [`Lease`] may stay uncommitted before its messages return
    /// to the queue (all engines). On Redis this is what brings back
    /// messages leased by a process that died. A commit after this time
    /// fails with [`Error::LeaseExpired`] and removes nothing. Default: 60 s.
    pub fn lease_timeout(mut self, timeout: Duration) -> Self {
        self.lease_timeout = timeout;
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

    /// How long a message sent without an expiry of its own stays queued
    /// when its user does not come back: plain sends
    /// ([`message_user`](MessageStore::message_user), [`info`](MessageStore::info), …,
    /// [`message_users`](MessageStore::message_users)), drafts without
    /// [`Draft::expires_after`] or [`Draft::never_expires`], and spooled
    /// sends without an expiry.
    ///
    /// Default: `None`, keeping every message until it is delivered. That
    /// is the safe choice for the user's data: a message such as "the
    /// import failed" must not vanish because its user was on holiday
    /// (django-async-messages silently dropped everything after 300
    /// seconds). Set it when your messages lose their point after a while.
    ///
    /// [`open`](Self::open) fails with [`Error::InvalidExpiry`] for a zero
    /// duration or one over [`MessageStore::MAX_EXPIRY`].
    pub fn default_expiry(mut self, expiry: Option<Duration>) -> Self {
        self.default_expiry = expiry;
        self
    }

    /// The wall clock for send times and expiry. Default: [`SystemClock`].
    /// Tests pass a [`ManualClock`](crate::ManualClock) to expire messages
    /// without waiting.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
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

    /// For tests only: the spool intake waits this long between storing a
    /// spooled message and removing its file, so that a test can kill the
    /// process in that window (`tests/spool.rs`). Default: zero.
    #[doc(hidden)]
    pub fn intake_pause_for_tests(mut self, pause: Duration) -> Self {
        self.intake_pause = pause;
        self
    }

    /// Opens the store, creating it if needed, and recovers from any crash:
    /// a bulk send that did not finish is rolled back, and records whose key
    /// is damaged are moved to quarantine (see [`MessageStore::quarantined`]).
    /// A record whose value is damaged stays until its user is read, which
    /// reports it as [`Error::Corrupt`] and moves it to quarantine.
    ///
    /// # Errors
    /// [`Error::NoPath`] without a path, Redis URL or in-memory choice;
    /// [`Error::TwoEngines`] with more than one; [`Error::NotADirectory`] if
    /// the path is a file; [`Error::AlreadyOpen`] if the store is open
    /// elsewhere; [`Error::PermissionDenied`]; [`Error::UnsupportedFormat`]
    /// for a store written by a newer release; [`Error::Redis`] when the
    /// Redis server cannot be reached or the `redis` feature is off;
    /// [`Error::Storage`] for other failures.
    pub fn open(self) -> Result<MessageStore> {
        if let Some(expiry) = self.default_expiry {
            key::check_expiry(expiry)?;
        }
        let common = self.common();
        let store_common = common.clone();
        let engine: Arc<dyn Engine> = match (self.path, self.redis, self.in_memory) {
            (None, None, false) => return Err(Error::NoPath),
            (Some(path), None, false) => Arc::new(SledEngine::open(SledOptions {
                path,
                durability: self.durability,
                cache_bytes: self.cache_bytes,
                lock_timeout: self.lock_timeout,
                index_slots: self.index_slots,
                disk_reserve: self.disk_reserve,
                skip_fdatasync: self.skip_fdatasync,
                intake_pause: self.intake_pause,
                common,
            })?),
            (None, Some(url), false) => open_redis(&url, &self.namespace, common)?,
            (None, None, true) => Arc::new(MemoryEngine::new(common)),
            (path, redis, in_memory) => {
                let mut chosen = Vec::new();
                if let Some(path) = path {
                    chosen.push(format!("path({})", path.display()));
                }
                if let Some(url) = redis {
                    chosen.push(format!("redis({})", crate::error::redact(&url)));
                }
                if in_memory {
                    chosen.push("in_memory()".to_owned());
                }
                return Err(Error::TwoEngines {
                    chosen: chosen.join(" and "),
                });
            }
        };
        Ok(MessageStore {
            engine,
            common: store_common,
        })
    }
}

impl Builder {
    fn common(&self) -> Common {
        Common {
            lease_timeout: self.lease_timeout,
            rules: Rules {
                min_level: self.min_level,
                max_message_bytes: self.max_message_bytes,
                default_expiry: self.default_expiry,
            },
            clock: self.clock.clone(),
            notifier: Arc::new(Notifier::default()),
        }
    }
}

#[cfg(feature = "redis")]
fn open_redis(url: &str, namespace: &str, common: Common) -> Result<Arc<dyn Engine>> {
    Ok(Arc::new(crate::engine::redis::RedisEngine::open(
        url, namespace, common,
    )?))
}

#[cfg(not(feature = "redis"))]
fn open_redis(url: &str, _namespace: &str, _common: Common) -> Result<Arc<dyn Engine>> {
    Err(Error::Redis {
        url: crate::error::redact(url),
        source:
            "this build of async-messages has no Redis support: enable the crate's `redis` feature"
                .into(),
    })
}

/// A bulk send reports progress every this many recipients read.
const BULK_CHUNK: u64 = 8192;

/// A persistent queue of messages for users. Cheap to clone (one `Arc`);
/// share it between threads. See the [crate docs](crate) for an example.
#[derive(Clone)]
pub struct MessageStore {
    engine: Arc<dyn Engine>,
    common: Common,
}

impl std::fmt::Debug for MessageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut debug = f.debug_struct("MessageStore");
        self.engine.describe(&mut debug);
        debug
            .field("min_level", &self.common.rules.min_level)
            .field("max_message_bytes", &self.common.rules.max_message_bytes)
            .field("default_expiry", &self.common.rules.default_expiry)
            .finish_non_exhaustive()
    }
}

impl MessageStore {
    /// The default for [`Builder::max_message_bytes`]: 64 KiB.
    pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 10;
    /// The largest value [`Builder::max_message_bytes`] accepts: 16 MiB.
    pub const MAX_MESSAGE_BYTES_LIMIT: usize = 16 << 20;
    /// The longest replace key ([`Draft::replace_key`]): 256 bytes.
    pub const MAX_REPLACE_KEY_BYTES: usize = 256;
    /// The longest expiry ([`Draft::expires_after`],
    /// [`Builder::default_expiry`]): 3,650 days. Longer ones are refused
    /// with [`Error::InvalidExpiry`]: leave the expiry out to keep a
    /// message until it is delivered.
    pub const MAX_EXPIRY: Duration = Duration::from_secs(3650 * 24 * 3600);

    /// Opens the store at `path` with the default settings; the same as
    /// `MessageStore::builder().path(path).open()`.
    ///
    /// # Errors
    /// As for [`Builder::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<MessageStore> {
        MessageStore::builder().path(path).open()
    }

    /// The default for [`Builder::namespace`]: `"async-messages"`.
    pub const DEFAULT_NAMESPACE: &str = "async-messages";

    /// Settings for opening a store, each with its default.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A store in this process's memory, with the default settings: for
    /// unit tests of code that sends messages. It keeps every promise of the
    /// other engines except surviving the handle (and its clones).
    #[must_use]
    pub fn in_memory() -> MessageStore {
        let common = Builder::default().common();
        MessageStore {
            engine: Arc::new(MemoryEngine::new(common.clone())),
            common,
        }
    }

    /// The store's directory; empty for a store on Redis or in memory.
    #[must_use]
    pub fn path(&self) -> &Path {
        self.engine.path()
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
        self.compose(text, level).to_user(user)
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
        progress: impl FnMut(Progress),
    ) -> Result<BulkSend> {
        self.compose(text, level)
            .to_users_with_progress(users, progress)
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
        self.engine.drain(&checked(user.into())?)
    }

    /// `false` when `user` certainly has nothing queued. On sled and in
    /// memory it is answered from memory without touching the disk or
    /// taking a lock (`true` may be a false alarm: another user shares the
    /// index slot); on Redis it is one round trip, and `true` when Redis
    /// cannot be reached.
    #[must_use]
    pub fn may_have_messages(&self, user: impl Into<UserId>) -> bool {
        checked(user.into()).is_ok_and(|user| self.engine.may_have(&user))
    }

    /// [`may_have_messages`](Self::may_have_messages) when it is answered
    /// from memory; `true` ("maybe") on an engine across the network, so
    /// that the caller never waits.
    pub(crate) fn may_have_messages_without_waiting(&self, user: &UserId) -> bool {
        !self.engine.may_have_is_local() || self.may_have_messages(user)
    }

    /// Returns `user`'s queued messages in send order without removing them.
    ///
    /// # Errors
    /// As for [`get_messages`](Self::get_messages).
    pub fn peek(&self, user: impl Into<UserId>) -> Result<Vec<Message>> {
        self.engine.peek(&checked(user.into())?)
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
    /// (removed for good) or released (back in the queue, in their original
    /// place). If the lease is dropped, or held longer than the lease
    /// timeout ([`Builder::lease_timeout`]), or the process dies, they come
    /// back. This gives at-least-once delivery: use it when a message must
    /// survive a page that fails to render.
    ///
    /// # Errors
    /// As for [`get_messages`](Self::get_messages).
    pub fn lease_messages(&self, user: impl Into<UserId>) -> Result<Lease> {
        let state = self.engine.lease(&checked(user.into())?)?;
        Ok(Lease { state: Some(state) })
    }

    /// Every user who may have messages queued, sorted (users whose queue
    /// turns out empty may be listed). For tools such as export; it reads
    /// the whole store.
    ///
    /// # Errors
    /// A storage error if the store cannot be read.
    pub fn users(&self) -> Result<Vec<UserId>> {
        let mut users = self.engine.users()?;
        users.sort_unstable();
        users.dedup();
        Ok(users)
    }

    /// What the store holds: users with messages, messages, bulk records,
    /// size on disk and quarantined records. It reads every user's queue
    /// (a damaged record found on the way is quarantined and counted).
    ///
    /// # Errors
    /// A storage error if the store cannot be read.
    pub fn stats(&self) -> Result<Stats> {
        let mut stats = Stats::default();
        for user in self.users()? {
            let queued = loop {
                match self.engine.peek(&user) {
                    Err(Error::Corrupt { .. }) => continue,
                    other => break other?.len() as u64,
                }
            };
            if queued > 0 {
                stats.users += 1;
                stats.messages += queued;
            }
        }
        stats.bulk_records = self.engine.bulk_records()?;
        stats.size_on_disk = self.engine.size_on_disk()?;
        stats.quarantined = self.engine.quarantined()?.len() as u64;
        Ok(stats)
    }

    /// Makes every write so far durable, also against a power loss (sled's
    /// flush, then `fdatasync`). Only needed with [`Durability::Periodic`].
    ///
    /// # Errors
    /// A storage error if the disk write fails.
    pub fn flush(&self) -> Result<()> {
        self.engine.flush()
    }

    /// The store's size on disk, in bytes.
    ///
    /// # Errors
    /// A storage error if the files cannot be read.
    pub fn size_on_disk(&self) -> Result<u64> {
        self.engine.size_on_disk()
    }

    /// The damaged records found so far (at open or when read), which were
    /// moved aside so that they cannot block their user's queue.
    ///
    /// # Errors
    /// A storage error if the quarantine cannot be read.
    pub fn quarantined(&self) -> Result<Vec<QuarantinedRecord>> {
        self.engine.quarantined()
    }

    /// Starts a message with more than a text and a level: an expiry, a
    /// replace key, or everyone as its recipients. Nothing is sent until
    /// the [`Draft`]'s `to_…` call.
    ///
    /// ```
    /// use std::time::Duration;
    /// use async_messages::{Level, MessageStore};
    ///
    /// let store = MessageStore::in_memory();
    /// store
    ///     .compose("Your report is ready", Level::Success)
    ///     .expires_after(Duration::from_secs(3600))
    ///     .replace_key("report:42")
    ///     .to_user(7_u64)?;
    /// // The job ran again: the newer message replaces the queued one.
    /// store
    ///     .compose("Your report is ready (updated)", Level::Success)
    ///     .replace_key("report:42")
    ///     .to_user(7_u64)?;
    /// let shown = store.get_messages(7_u64)?;
    /// assert_eq!(shown.len(), 1);
    /// assert_eq!(shown[0].text(), "Your report is ready (updated)");
    ///
    /// store
    ///     .compose("Maintenance tonight from 22:00", Level::Warning)
    ///     .expires_after(Duration::from_secs(12 * 3600))
    ///     .to_everyone()?;
    /// assert_eq!(store.get_messages("someone-new")?.len(), 1);
    /// # Ok::<(), async_messages::Error>(())
    /// ```
    pub fn compose(&self, text: impl Into<String>, level: Level) -> Draft<'_> {
        Draft {
            store: self,
            text: text.into(),
            level,
            expiry: Expiry::Default,
            replace_key: None,
        }
    }

    /// Waits for news of `user`'s queue, for live delivery (see [`Watch`];
    /// with feature `axum`, [`LiveMessages`](crate::LiveMessages) turns it
    /// into a server-sent event stream). On Redis the first watch subscribes
    /// to the store's channel, so that sends from other processes wake it.
    ///
    /// # Errors
    /// [`Error::UserIdTooLong`]; [`Error::Redis`] if the subscription fails.
    pub fn watch(&self, user: impl Into<UserId>) -> Result<Watch> {
        let prefix = key::user_prefix(&checked(user.into())?)?;
        self.engine.start_live()?;
        Ok(Watch::new(self.common.notifier.clone(), &prefix))
    }

    /// The message a draft stores, or `None` below the minimum level.
    fn outgoing(&self, draft: Draft<'_>) -> Result<Option<Outgoing>> {
        check_draft(
            &self.common.rules,
            &draft.text,
            draft.replace_key.as_deref(),
            draft.expiry,
        )?;
        let expiry = match draft.expiry {
            Expiry::Default => self.common.rules.default_expiry,
            Expiry::After(after) => Some(after),
            Expiry::Never => None,
        };
        if draft.level < self.common.rules.min_level {
            return Ok(None);
        }
        let sent_at_ms = self.common.now_ms();
        Ok(Some(Outgoing {
            text: draft.text,
            level: draft.level,
            sent_at_ms,
            expires_at_ms: expiry.map(|after| crate::clock::deadline_ms(sent_at_ms, after)),
            replace_key: draft.replace_key,
        }))
    }
}

/// The checks of a draft's text, replace key and expiry (a store's and a
/// spool's): the first that fails is the error.
pub(crate) fn check_draft(
    rules: &Rules,
    text: &str,
    replace_key: Option<&str>,
    expiry: Expiry,
) -> Result<()> {
    rules.check_text(text)?;
    if let Some(replace_key) = replace_key {
        key::check_replace_key(replace_key)?;
    }
    if let Expiry::After(after) = expiry {
        key::check_expiry(after)?;
    }
    Ok(())
}

/// When a draft (of the store or of a spool) expires.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Expiry {
    /// The store's [`Builder::default_expiry`].
    Default,
    After(Duration),
    Never,
}

/// A message being composed; made by [`MessageStore::compose`]. Nothing is
/// stored until one of the `to_…` calls, which check everything first:
/// on an error nothing is stored.
#[must_use = "a draft sends nothing until .to_user(), .to_users() or .to_everyone()"]
pub struct Draft<'a> {
    store: &'a MessageStore,
    text: String,
    level: Level,
    expiry: Expiry,
    replace_key: Option<String>,
}

impl std::fmt::Debug for Draft<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Draft")
            .field("text", &self.text)
            .field("level", &self.level)
            .field("expiry", &self.expiry)
            .field("replace_key", &self.replace_key)
            .finish_non_exhaustive()
    }
}

impl Draft<'_> {
    /// Drops the message, undelivered, once `after` has passed (measured
    /// from the send, on the store's [`Clock`]). An expired message is
    /// never delivered, peeked, counted or leased, and its space is
    /// reclaimed in the background. Bulk sends and announcements expire as
    /// a whole. From 1 ms to [`MessageStore::MAX_EXPIRY`]; anything else
    /// is [`Error::InvalidExpiry`] at the send.
    ///
    /// Expiry times are wall-clock times: if the clock jumps forward,
    /// messages expire early; if it is set back, they live longer. On
    /// Redis each process judges by its own clock, so keep the servers'
    /// clocks in sync (NTP).
    pub fn expires_after(mut self, after: Duration) -> Self {
        self.expiry = Expiry::After(after);
        self
    }

    /// Keeps the message until it is delivered, whatever
    /// [`Builder::default_expiry`] says.
    pub fn never_expires(mut self) -> Self {
        self.expiry = Expiry::Never;
        self
    }

    /// A key naming what the message is about, such as `"report:42"`: in
    /// each recipient's queue, this message replaces a queued one with the
    /// same key, atomically with the send (the old one is never delivered;
    /// the new one takes its turn at the end of the queue). Concurrent
    /// sends with one key leave exactly one message. Keys are per user; a
    /// bulk send or an announcement with a key replaces each recipient's
    /// own older copy. Once a message is delivered its key is free again.
    ///
    /// A message taken by a [`Lease`] is not in the queue while leased: a
    /// send with its key queues the new message beside it. If the lease
    /// commits, the old message was shown and the new one follows on the
    /// next read; if the lease is released (the page failed), the old one
    /// comes back and is dropped in favour of the newer one still queued.
    /// If the newer one was delivered meanwhile (to another tab), the old
    /// one was never shown, and it comes back once.
    ///
    /// Non-empty, at most [`MessageStore::MAX_REPLACE_KEY_BYTES`] bytes;
    /// otherwise [`Error::EmptyReplaceKey`] or [`Error::ReplaceKeyTooLong`]
    /// at the send.
    pub fn replace_key(mut self, key: impl Into<String>) -> Self {
        self.replace_key = Some(key.into());
        self
    }

    /// Sends to one user. Returns the message's id, or `None` when the
    /// level is below the store's minimum level (nothing is stored).
    ///
    /// # Errors
    /// As for [`MessageStore::message_user`], plus
    /// [`Error::EmptyReplaceKey`], [`Error::ReplaceKeyTooLong`] and
    /// [`Error::InvalidExpiry`] before anything is written.
    pub fn to_user(self, user: impl Into<UserId>) -> Result<Option<MessageId>> {
        let store = self.store;
        let user = user.into();
        let message = store.outgoing(self)?;
        let user = checked(user)?;
        let Some(message) = message else {
            return Ok(None);
        };
        let id = store.engine.send(&user, &message)?;
        store.common.notifier.user(&user);
        Ok(Some(id))
    }

    /// Sends to every user in `users`, all or nothing, stored once; see
    /// [`MessageStore::message_users`].
    ///
    /// # Errors
    /// As for [`to_user`](Self::to_user).
    pub fn to_users<U: Into<UserId>>(self, users: impl IntoIterator<Item = U>) -> Result<BulkSend> {
        self.to_users_with_progress(users, |_| {})
    }

    /// [`to_users`](Self::to_users), calling `progress` as recipients are
    /// written; see [`MessageStore::message_users_with_progress`].
    ///
    /// # Errors
    /// As for [`to_user`](Self::to_user).
    pub fn to_users_with_progress<U: Into<UserId>>(
        self,
        users: impl IntoIterator<Item = U>,
        mut progress: impl FnMut(Progress),
    ) -> Result<BulkSend> {
        let store = self.store;
        let Some(message) = store.outgoing(self)? else {
            return Ok(BulkSend::none());
        };
        let engine = &store.engine;
        // Up to the threshold, a copy per recipient; above it, one record.
        let mut users = users.into_iter().map(Into::into);
        let first: Vec<UserId> = users.by_ref().take(THRESHOLD + 1).collect();
        let sent = if first.len() > THRESHOLD {
            let mut set = Recipients::default();
            let mut read = 0_u64;
            for user in first.into_iter().chain(users) {
                key::check_user(&user)?;
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
            let sent = engine.send_bulk(set, &message)?;
            store.common.notifier.everyone();
            sent
        } else {
            first.iter().try_for_each(key::check_user)?;
            let sent = engine.send_few(&first, &message, &mut |written| {
                progress(Progress {
                    written,
                    committed: false,
                });
            })?;
            for user in &first {
                store.common.notifier.user(user);
            }
            sent
        };
        if sent.id.is_some() {
            progress(Progress {
                written: sent.recipients,
                committed: true,
            });
        }
        Ok(sent)
    }

    /// Sends an announcement to every user: each user who reads their
    /// queue before it expires gets it once, in send order with their
    /// other messages, users the store has never seen included. It is
    /// stored once, however many users there are, and survives restarts
    /// (a user who got it does not get it again). Requests without a user
    /// get nothing. Without an expiry it stays until the store is deleted,
    /// waiting for users who have not come yet: give announcements an
    /// expiry.
    ///
    /// # Errors
    /// [`Error::BelowMinimumLevel`] when the level is below the store's
    /// minimum (an announcement must reach people); otherwise as for
    /// [`to_user`](Self::to_user).
    pub fn to_everyone(self) -> Result<MessageId> {
        let store = self.store;
        let level = self.level;
        let Some(message) = store.outgoing(self)? else {
            return Err(Error::BelowMinimumLevel {
                level,
                minimum: store.common.rules.min_level,
            });
        };
        let id = store.engine.send_everyone(&message)?;
        store.common.notifier.everyone();
        Ok(id)
    }
}

/// What a store holds; see [`MessageStore::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Users with at least one message queued.
    pub users: u64,
    /// Messages queued, once per recipient (leased ones included).
    pub messages: u64,
    /// Large bulk sends, each stored as one record.
    pub bulk_records: u64,
    /// Bytes on disk (0 on Redis and in memory).
    pub size_on_disk: u64,
    /// Records moved to quarantine.
    pub quarantined: u64,
}

/// Messages taken by [`MessageStore::lease_messages`], not yet removed.
///
/// [`commit`](Lease::commit) removes them; [`release`](Lease::release), or
/// dropping the lease, puts them back in the queue.
#[must_use = "a lease puts its messages back when dropped; call .commit() once they are shown"]
pub struct Lease {
    state: Option<Box<dyn LeaseState>>,
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
        self.state.as_ref().map_or(&[], |state| state.messages())
    }

    /// Removes the leased messages for good.
    ///
    /// # Errors
    /// [`Error::LeaseExpired`] if the lease was held longer than the lease
    /// timeout: nothing is removed, and the messages are delivered again.
    /// A storage error if the removal fails; the messages then stay queued.
    pub fn commit(mut self) -> Result<Vec<Message>> {
        match self.state.take() {
            Some(state) => state.commit(),
            None => Ok(Vec::new()),
        }
    }

    /// Puts the messages back in the queue (the same as dropping the lease).
    pub fn release(mut self) {
        if let Some(state) = self.state.take() {
            state.release();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            state.release();
        }
    }
}

/// A user id that passed the shared checks (a string id's length).
fn checked(user: UserId) -> Result<UserId> {
    key::check_user(&user)?;
    Ok(user)
}
