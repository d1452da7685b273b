//! Sends from other processes: a spool directory, as in mail systems.
//!
//! A [`Spool`] writes each send as one file: into `spool/tmp/`, fsynced,
//! then renamed into `spool/new/` (a rename is atomic, so the store never
//! sees half a file) and the directory fsynced. The process holding the
//! store takes files in as they appear (watched with inotify, and checked
//! every second in case a notification is missed) and at open. Taking a file
//! in is exactly once: the message and a mark naming the file are written in
//! one atomic write, made durable, and only then is the file removed; a
//! file whose mark exists is not taken again.
//!
//! ```text
//! spool file:  SPOOL_VERSION ‖ "AMSP" ‖ bincode(Entry) ‖ FNV-64 of what precedes
//! file name:   <20-digit stamp>.<pid>.<counter>.msg
//! ```
//!
//! The entry (format version 2) holds the recipients (none for an
//! announcement to everyone), level, text, send time, and the draft's
//! expiry time and replace key (see [`Spool::compose`]). Files of version 1,
//! written by earlier releases, are still taken in (no expiry of their own,
//! no key).
//!
//! The stamp is the sender's clock in nanoseconds, kept increasing within a
//! process, so files sort in send order per sender and the store takes them
//! in that order. Spooled messages get their id when taken in: they come
//! after everything sent in the app before that moment.
//!
//! The spool directory is created owner-only (`0700`). The store refuses a
//! file it cannot trust (not a regular file, another owner than the spool
//! directory's, too large, a foreign name, damaged): it is moved to
//! `spool/rejected/` with a log line, and the others go on.

pub(crate) mod format;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

pub(crate) use self::format::Dirs;
use self::format::Entry;
use self::format::{SpoolUser, encode, next_name};
use crate::engine::Rules;
use crate::fs::{io_error, sync_dir};
use crate::message::now_ms;
use crate::store::{Expiry, check_draft};
use crate::{Error, Level, MessageStore, Result, UserId, key};

/// Sends from any process: to a store's spool directory, whether or not the
/// app that holds the store is running, or straight to Redis.
///
/// ```
/// # fn main() -> Result<(), async_messages::Error> {
/// # let dir = tempfile::tempdir().map_err(|e| async_messages::Error::Storage { path: Default::default(), source: e.into() })?;
/// use async_messages::{MessageStore, Spool};
///
/// let store = MessageStore::open(dir.path())?; // the app
///
/// // Another process (a cron job, a deploy script):
/// let spool = Spool::open(dir.path())?;
/// spool.success(42_u64, "The nightly import finished")?;
///
/// # let started = std::time::Instant::now();
/// # while store.count(42_u64)? == 0 && started.elapsed().as_secs() < 10 {
/// #     std::thread::sleep(std::time::Duration::from_millis(5));
/// # }
/// // The app takes it in within milliseconds (or at its next open).
/// assert_eq!(store.get_messages(42_u64)?[0].text(), "The nightly import finished");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Spool {
    target: Target,
}

#[derive(Debug)]
enum Target {
    Dir(Dirs),
    Store(MessageStore),
}

impl std::fmt::Debug for Dirs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dirs").field("root", &self.root).finish()
    }
}

impl Spool {
    /// The spool of the store in directory `store` (created, owner-only, if
    /// missing).
    ///
    /// # Errors
    /// [`Error::NotADirectory`] if `store` is a file;
    /// [`Error::NotSpoolOwner`] if this process runs as another user than
    /// the one owning the store (its spool, or its directory before it has
    /// one): the store would refuse the files;
    /// [`Error::PermissionDenied`] or another storage error if the spool
    /// directory cannot be created.
    pub fn open(store: impl AsRef<Path>) -> Result<Spool> {
        let store = store.as_ref();
        if store.exists() && !store.is_dir() {
            return Err(Error::NotADirectory {
                path: store.to_path_buf(),
            });
        }
        if let Some((owner, user)) = owner_mismatch(store) {
            return Err(Error::NotSpoolOwner {
                path: store.to_path_buf(),
                owner,
                user,
            });
        }
        fs::DirBuilder::new()
            .recursive(true)
            .create(store)
            .map_err(|e| io_error(store, e))?;
        let dirs = Dirs::of(store);
        dirs.create()?;
        Ok(Spool {
            target: Target::Dir(dirs),
        })
    }

    /// Sends straight to the store on the Redis server at `url`, under
    /// `namespace` (the store's [`Builder::namespace`](crate::Builder::namespace)):
    /// with Redis, every process can open the store itself.
    ///
    /// # Errors
    /// As for [`Builder::open`](crate::Builder::open) with a Redis URL.
    pub fn redis(url: &str, namespace: &str) -> Result<Spool> {
        let store = MessageStore::builder()
            .redis(url)
            .namespace(namespace)
            .open()?;
        Ok(Spool {
            target: Target::Store(store),
        })
    }

    /// Starts a message with more than a text and a level: an expiry, a
    /// replace key, or everyone as its recipients, as
    /// [`MessageStore::compose`] does. Nothing is written until the
    /// [`SpoolDraft`]'s `to_…` call.
    ///
    /// ```
    /// # fn main() -> Result<(), async_messages::Error> {
    /// # let dir = tempfile::tempdir().map_err(|e| async_messages::Error::Storage { path: Default::default(), source: e.into() })?;
    /// use std::time::Duration;
    /// use async_messages::{Level, Spool};
    ///
    /// let spool = Spool::open(dir.path())?;
    /// // A nightly job: shown once, however often the job runs, for a day.
    /// spool
    ///     .compose("The nightly import finished", Level::Success)
    ///     .expires_after(Duration::from_secs(24 * 3600))
    ///     .replace_key("nightly-import")
    ///     .to_user(42_u64)?;
    /// // A deploy script: every user who comes in the next 12 hours.
    /// spool
    ///     .compose("Maintenance tonight from 22:00", Level::Warning)
    ///     .expires_after(Duration::from_secs(12 * 3600))
    ///     .to_everyone()?;
    /// # Ok(()) }
    /// ```
    pub fn compose(&self, text: impl Into<String>, level: Level) -> SpoolDraft<'_> {
        SpoolDraft {
            spool: self,
            text: text.into(),
            level,
            expiry: Expiry::Default,
            replace_key: None,
        }
    }

    /// Queues `text` for `user`. Returns once the message is durable in the
    /// spool (fsynced and renamed into place); the store gives it an id when
    /// it takes it in. A level below the store's minimum is dropped then.
    ///
    /// # Errors
    /// As for [`MessageStore::message_user`]: [`Error::EmptyMessage`],
    /// [`Error::MessageTooLarge`] (over the default limit of 64 KiB; the
    /// store checks its own limit again when it takes the message in) and
    /// [`Error::UserIdTooLong`] before anything is written;
    /// [`Error::DiskFull`] if the spool's disk is full (nothing is left behind).
    pub fn message_user(
        &self,
        user: impl Into<UserId>,
        text: impl Into<String>,
        level: Level,
    ) -> Result<()> {
        self.compose(text, level).to_user(user)
    }

    /// Queues one message for every user in `users`, all or nothing (one
    /// spool file). A user listed twice gets it once.
    ///
    /// # Errors
    /// As for [`message_user`](Self::message_user).
    pub fn message_users<U: Into<UserId>>(
        &self,
        users: impl IntoIterator<Item = U>,
        text: impl Into<String>,
        level: Level,
    ) -> Result<()> {
        self.compose(text, level).to_users(users)
    }

    /// Queues a [`Level::Debug`] message (dropped unless the store's minimum
    /// level is lowered).
    ///
    /// # Errors
    /// As for [`message_user`](Self::message_user).
    pub fn debug(&self, user: impl Into<UserId>, text: impl Into<String>) -> Result<()> {
        self.message_user(user, text, Level::Debug)
    }

    /// Queues a [`Level::Info`] message.
    ///
    /// # Errors
    /// As for [`message_user`](Self::message_user).
    pub fn info(&self, user: impl Into<UserId>, text: impl Into<String>) -> Result<()> {
        self.message_user(user, text, Level::Info)
    }

    /// Queues a [`Level::Success`] message.
    ///
    /// # Errors
    /// As for [`message_user`](Self::message_user).
    pub fn success(&self, user: impl Into<UserId>, text: impl Into<String>) -> Result<()> {
        self.message_user(user, text, Level::Success)
    }

    /// Queues a [`Level::Warning`] message.
    ///
    /// # Errors
    /// As for [`message_user`](Self::message_user).
    pub fn warning(&self, user: impl Into<UserId>, text: impl Into<String>) -> Result<()> {
        self.message_user(user, text, Level::Warning)
    }

    /// Queues a [`Level::Error`] message.
    ///
    /// # Errors
    /// As for [`message_user`](Self::message_user).
    pub fn error(&self, user: impl Into<UserId>, text: impl Into<String>) -> Result<()> {
        self.message_user(user, text, Level::Error)
    }
}

/// A message being composed for a [`Spool`]; made by [`Spool::compose`].
/// The same shape, rules and errors as the store's
/// [`Draft`](crate::Draft): nothing is written until one of the `to_…`
/// calls, which check everything first; on an error nothing is written.
///
/// On a directory spool, the send is durable in the spool when the call
/// returns, and the store applies it when it takes the file in (at once
/// while the app runs, else at its next open): a level below the store's
/// minimum is dropped then, as is a message that has already expired by
/// the store's clock. On Redis ([`Spool::redis`]) it is stored at once,
/// as [`Draft`](crate::Draft) does.
#[must_use = "a draft sends nothing until .to_user(), .to_users() or .to_everyone()"]
pub struct SpoolDraft<'a> {
    spool: &'a Spool,
    text: String,
    level: Level,
    expiry: Expiry,
    replace_key: Option<String>,
}

impl std::fmt::Debug for SpoolDraft<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolDraft")
            .field("text", &self.text)
            .field("level", &self.level)
            .field("expiry", &self.expiry)
            .field("replace_key", &self.replace_key)
            .finish_non_exhaustive()
    }
}

impl SpoolDraft<'_> {
    /// Drops the message, undelivered, once `after` has passed since this
    /// send (see [`Draft::expires_after`](crate::Draft::expires_after)).
    /// The expiry time is fixed now, by this process's clock: a message
    /// that waits in the spool longer than `after` (the app was stopped) is
    /// dropped when the store takes it in, never shown. From 1 ms to
    /// [`MessageStore::MAX_EXPIRY`]; anything else is
    /// [`Error::InvalidExpiry`] at the send.
    pub fn expires_after(mut self, after: Duration) -> Self {
        self.expiry = Expiry::After(after);
        self
    }

    /// Keeps the message until it is delivered, whatever the store's
    /// [`Builder::default_expiry`](crate::Builder::default_expiry) says.
    pub fn never_expires(mut self) -> Self {
        self.expiry = Expiry::Never;
        self
    }

    /// In each recipient's queue, this message replaces a queued one with
    /// the same key (see [`Draft::replace_key`](crate::Draft::replace_key)),
    /// from the moment the store takes it in. Non-empty, at most
    /// [`MessageStore::MAX_REPLACE_KEY_BYTES`] bytes; otherwise
    /// [`Error::EmptyReplaceKey`] or [`Error::ReplaceKeyTooLong`] at the send.
    pub fn replace_key(mut self, key: impl Into<String>) -> Self {
        self.replace_key = Some(key.into());
        self
    }

    /// Queues the message for one user.
    ///
    /// # Errors
    /// As for [`Spool::message_user`], plus [`Error::EmptyReplaceKey`],
    /// [`Error::ReplaceKeyTooLong`] and [`Error::InvalidExpiry`] before
    /// anything is written.
    pub fn to_user(self, user: impl Into<UserId>) -> Result<()> {
        self.to_users([user.into()])
    }

    /// Queues the message for every user in `users`, all or nothing (one
    /// spool file), stored once by the store; a user listed twice gets it
    /// once. An empty list writes nothing.
    ///
    /// # Errors
    /// As for [`to_user`](Self::to_user).
    pub fn to_users<U: Into<UserId>>(self, users: impl IntoIterator<Item = U>) -> Result<()> {
        let users: Vec<UserId> = users.into_iter().map(Into::into).collect();
        let dirs = match &self.spool.target {
            Target::Store(store) => return self.draft(store).to_users(users).map(drop),
            Target::Dir(dirs) => dirs,
        };
        let entry = self.entry(false)?;
        users.iter().try_for_each(key::check_user)?;
        if users.is_empty() {
            return Ok(());
        }
        let entry = Entry {
            users: users.iter().map(SpoolUser::from).collect(),
            ..entry
        };
        write_entry(dirs, &encode(&entry))
    }

    /// Queues an announcement to every user: once the store takes it in,
    /// each user who reads their queue before it expires gets it once,
    /// users the store has never seen included (see
    /// [`Draft::to_everyone`](crate::Draft::to_everyone)). Give
    /// announcements an expiry.
    ///
    /// On a directory spool, an announcement below the store's minimum
    /// level is dropped when the store takes it in, with a warning in its
    /// log (the sender cannot know the store's minimum); on Redis it is
    /// refused at once with [`Error::BelowMinimumLevel`].
    ///
    /// # Errors
    /// As for [`to_user`](Self::to_user).
    pub fn to_everyone(self) -> Result<()> {
        let dirs = match &self.spool.target {
            Target::Store(store) => return self.draft(store).to_everyone().map(drop),
            Target::Dir(dirs) => dirs,
        };
        write_entry(dirs, &encode(&self.entry(true)?))
    }

    /// The same message as a store's draft (a spool on Redis).
    fn draft(self, store: &MessageStore) -> crate::Draft<'_> {
        let mut draft = store.compose(self.text, self.level);
        draft = match self.expiry {
            Expiry::Default => draft,
            Expiry::After(after) => draft.expires_after(after),
            Expiry::Never => draft.never_expires(),
        };
        match self.replace_key {
            Some(key) => draft.replace_key(key),
            None => draft,
        }
    }

    /// The spool entry, checked, without recipients.
    fn entry(self, everyone: bool) -> Result<Entry> {
        // The store's default limits: it checks its own again at intake.
        check_draft(
            &Rules::default(),
            &self.text,
            self.replace_key.as_deref(),
            self.expiry,
        )?;
        let sent_at_ms = now_ms();
        Ok(Entry {
            users: Vec::new(),
            level: self.level as u8,
            text: self.text,
            sent_at_ms,
            expires_at_ms: match self.expiry {
                Expiry::After(after) => Some(crate::clock::deadline_ms(sent_at_ms, after)),
                Expiry::Default | Expiry::Never => None,
            },
            never_expires: matches!(self.expiry, Expiry::Never),
            replace_key: self.replace_key,
            everyone,
        })
    }
}

/// The owner of a store's spool (or, before it has one, of the store's
/// directory) and this process's user, when they differ.
fn owner_mismatch(store: &Path) -> Option<(u32, u32)> {
    // /proc/self belongs to this process's effective user (Linux).
    let user = fs::metadata("/proc/self").ok()?.uid();
    let owner = fs::metadata(store.join("spool"))
        .or_else(|_| fs::metadata(store))
        .ok()?
        .uid();
    (owner != user).then_some((owner, user))
}

/// Writes `bytes` as a new spool file: temporary file, fsync, rename,
/// directory fsync. On failure nothing is left behind.
fn write_entry(dirs: &Dirs, bytes: &[u8]) -> Result<()> {
    let name = next_name();
    let tmp = dirs.tmp.join(&name);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file: File| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, dirs.new.join(&name)));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_error(&dirs.root, e));
    }
    sync_dir(&dirs.new)
}
