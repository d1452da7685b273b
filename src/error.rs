//! The one error type.

use std::path::PathBuf;

/// A result whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong. Each message is a sentence that says what
/// happened and, where there is one, what to do about it.
///
/// Errors caused by the caller's input (a message that is too large, an
/// empty message, an over-long user id) are raised before anything is written:
/// the store is unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The message text is larger than the store's limit; nothing was stored.
    #[error(
        "the message is {size} bytes, over this store's limit of {limit} bytes; nothing was stored (shorten it, or raise the limit with MessageStore::builder().max_message_bytes(..))"
    )]
    MessageTooLarge {
        /// The text's size in bytes.
        size: usize,
        /// The store's limit in bytes.
        limit: usize,
    },

    /// The message text is empty; nothing was stored.
    #[error(
        "the message text is empty; nothing was stored (an empty message shows the user nothing)"
    )]
    EmptyMessage,

    /// A string user id is longer than [`UserId::MAX_STR_BYTES`](crate::UserId::MAX_STR_BYTES).
    #[error(
        "a user id is {len} bytes long, over the limit of {limit} bytes; nothing was stored (use a shorter id, such as the user's primary key)"
    )]
    UserIdTooLong {
        /// The id's length in bytes.
        len: usize,
        /// The limit in bytes.
        limit: usize,
    },

    /// A replace key is empty; nothing was stored.
    #[error(
        "the replace key is empty; nothing was stored (use a key naming what the message is about, such as \"report:42\", or leave the key out)"
    )]
    EmptyReplaceKey,

    /// A replace key is longer than [`MessageStore::MAX_REPLACE_KEY_BYTES`](crate::MessageStore::MAX_REPLACE_KEY_BYTES).
    #[error(
        "the replace key is {len} bytes long, over the limit of {limit} bytes; nothing was stored (name the subject with a shorter key, such as \"report:42\")"
    )]
    ReplaceKeyTooLong {
        /// The key's length in bytes.
        len: usize,
        /// The limit in bytes.
        limit: usize,
    },

    /// An expiry duration is zero or too long to mean anything; nothing
    /// was stored (or, from the builder, the store was not opened).
    #[error(
        "an expiry of {duration:?} is not allowed: {reason}; nothing was stored (use a duration from 1 ms to {limit:?}, or no expiry to keep the message until it is delivered)"
    )]
    InvalidExpiry {
        /// The duration given.
        duration: std::time::Duration,
        /// What is wrong with it.
        reason: &'static str,
        /// The longest expiry allowed ([`MessageStore::MAX_EXPIRY`](crate::MessageStore::MAX_EXPIRY)).
        limit: std::time::Duration,
    },

    /// An announcement's level is below the store's minimum level, so it
    /// would reach no one; nothing was stored.
    #[error(
        "the announcement's level {level} is below this store's minimum level {minimum}, so no one would see it; nothing was stored (raise its level, or lower the minimum with MessageStore::builder().min_level(..))"
    )]
    BelowMinimumLevel {
        /// The announcement's level.
        level: crate::Level,
        /// The store's minimum level.
        minimum: crate::Level,
    },

    /// A level name could not be parsed.
    #[error(
        "{input:?} is not a message level; use one of debug, info, success, warning, error (or 10, 20, 25, 30, 40)"
    )]
    UnknownLevel {
        /// What was given.
        input: String,
    },

    /// The builder was asked to open a store without a path.
    #[error(
        "no place was given for the message store; call MessageStore::builder().path(..) (embedded, on disk) or .redis(..) (several servers) before open(), or use MessageStore::in_memory() in tests"
    )]
    NoPath,

    /// The builder was given more than one place for the store.
    #[error(
        "the message store was given {chosen}; a store lives in one place, so keep only one of them"
    )]
    TwoEngines {
        /// The places given, e.g. `path(/srv/messages) and redis(redis://cache:6379/0)`.
        chosen: String,
    },

    /// The Redis server could not be reached, refused the request, or
    /// answered in a way this library does not understand. The operation
    /// was not done, with one exception: a send whose connection broke
    /// after the request left may have been stored (as with any network
    /// store). The handle reconnects by itself once the server is back.
    #[error(
        "the Redis server at {url} failed: {source}; check that it runs and that the URL (host, port, password, TLS) is right (the handle reconnects by itself when it is back)"
    )]
    Redis {
        /// The server's URL, with any password replaced by `***`.
        url: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// A [`Spool`](crate::Spool) was opened by another user than the owner
    /// of the store's spool: the store takes in only its owner's files, so
    /// nothing would be delivered.
    #[error(
        "the spool of the message store at {path} belongs to user {owner} and this process runs as user {user}, but the store takes in only files spooled by its owner; send as that user (for example with sudo -u '#{owner}'); nothing was stored"
    )]
    NotSpoolOwner {
        /// The store's directory.
        path: PathBuf,
        /// The user id owning the spool.
        owner: u32,
        /// This process's user id.
        user: u32,
    },

    /// A lease was committed after the store's lease timeout: its messages
    /// had gone back to the queue, so nothing was removed.
    #[error(
        "the lease was held longer than the store's lease timeout of {timeout:?}, so its messages went back to the queue and will be delivered again; commit sooner, or raise the timeout with MessageStore::builder().lease_timeout(..)"
    )]
    LeaseExpired {
        /// The store's lease timeout.
        timeout: std::time::Duration,
    },

    /// Another handle, in this process or another one, has the store open.
    #[error(
        "the message store at {path} is already open (in this process or another one); share one MessageStore handle (it is cheap to clone) or close the other process first"
    )]
    AlreadyOpen {
        /// The store's directory.
        path: PathBuf,
    },

    /// The path exists and is not a directory, so no store can be created there.
    #[error(
        "{path} exists and is not a directory; a message store is a directory, so choose another path"
    )]
    NotADirectory {
        /// The path given.
        path: PathBuf,
    },

    /// The operating system refused access to the store's files.
    #[error(
        "permission denied on the message store at {path}; check that this user can read and write that directory"
    )]
    PermissionDenied {
        /// The store's directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The disk is full; the operation did not complete.
    #[error(
        "the disk holding the message store at {path} is full; free some space and try again (the failed operation was undone)"
    )]
    DiskFull {
        /// The store's directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The store was written by a newer version of this library.
    #[error(
        "the message store at {path} uses format version {found}, but this version of async-messages reads only up to {supported}; upgrade async-messages"
    )]
    UnsupportedFormat {
        /// The store's directory.
        path: PathBuf,
        /// The version found on disk.
        found: u8,
        /// The newest version this library reads.
        supported: u8,
    },

    /// Fewer records could be read than the store held when it was last
    /// closed cleanly: sled skipped a damaged part of its log. Nothing was
    /// changed; the readable messages are intact.
    #[error(
        "the message store at {path} held {expected} records when it was last closed, but only {found} can be read: part of its log file is damaged and was skipped; restore a backup, or accept the loss by deleting {mark} and opening the store again"
    )]
    DataLoss {
        /// The store's directory.
        path: PathBuf,
        /// Records at the last clean close.
        expected: u64,
        /// Records found now.
        found: u64,
        /// The clean-close mark to delete to accept the loss.
        mark: PathBuf,
    },

    /// A stored record could not be decoded. It has been moved to the store's
    /// quarantine (see [`MessageStore::quarantined`](crate::MessageStore::quarantined)),
    /// so the next call for the same user works again.
    #[error(
        "a stored message record {what} is damaged ({reason}); it was moved to quarantine and the user's other messages are kept"
    )]
    Corrupt {
        /// Which record, e.g. `for user 42`.
        what: String,
        /// Why it could not be decoded.
        reason: String,
    },

    /// The storage engine failed (an I/O error or internal failure).
    #[error("the message store at {path} failed: {source}")]
    Storage {
        /// The store's directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl Error {
    /// An equivalent error, for handing one failure to several waiters.
    pub(crate) fn duplicate(&self) -> Error {
        let io = |e: &std::io::Error| std::io::Error::new(e.kind(), e.to_string());
        match self {
            Error::DiskFull { path, source } => Error::DiskFull {
                path: path.clone(),
                source: io(source),
            },
            Error::PermissionDenied { path, source } => Error::PermissionDenied {
                path: path.clone(),
                source: io(source),
            },
            other => Error::Storage {
                path: match other {
                    Error::Storage { path, .. } => path.clone(),
                    _ => PathBuf::new(),
                },
                source: other.to_string().into(),
            },
        }
    }
}

/// `url` with any password replaced by `***`, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            let user = if rest[..at].contains(':') {
                format!("{user}:***")
            } else {
                "***".to_owned()
            };
            format!("{scheme}://{user}@{}", &rest[at + 1..])
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_passwords_only() {
        assert_eq!(
            redact("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(
            redact("redis://:s3cret@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(
            redact("rediss://app:s3cret@host/1"),
            "rediss://app:***@host/1"
        );
        assert_eq!(redact("redis://token@host"), "redis://***@host");
        assert_eq!(redact("not a url"), "not a url");
    }
}
