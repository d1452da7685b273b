//! What STORE and USER name, and opening the store for a command.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_messages::{Durability, Error, Level, MessageStore, Spool, UserId};

use crate::Failure;

/// How long a command waits for a directory store's lock. Long enough for a
/// process that has just exited to let go, short enough not to hang while
/// the app holds it.
const LOCK_TIMEOUT: Duration = Duration::from_millis(200);

/// Where a store lives.
#[derive(Debug)]
pub(crate) enum Target {
    /// A directory, on sled.
    Dir(PathBuf),
    /// A Redis server, under a key prefix.
    Redis { url: String, namespace: String },
}

/// What is at a directory store's path.
#[derive(Debug, PartialEq, Eq)]
enum DirState {
    Missing,
    NotADirectory,
    Empty,
    /// It holds a store's files, or its spool (sends made before the app
    /// first opened it).
    Store,
    /// A directory with other things in it.
    Other,
}

impl Target {
    /// Reads STORE: a `redis://` or `rediss://` URL, else a directory.
    pub(crate) fn parse(store: &str, namespace: Option<&str>) -> Result<Target, Failure> {
        if store.is_empty() {
            return Err(
                "STORE is empty; give the store's directory or a redis:// URL"
                    .to_owned()
                    .into(),
            );
        }
        if store.starts_with("redis://") || store.starts_with("rediss://") {
            if !cfg!(feature = "redis") {
                return Err(format!(
                    "{} is a Redis URL, but this build of async-messages has no Redis support; reinstall it with the `redis` feature (cargo install --path . --features cli,redis)",
                    redact(store)
                )
                .into());
            }
            return Ok(Target::Redis {
                url: store.to_owned(),
                namespace: namespace
                    .unwrap_or(MessageStore::DEFAULT_NAMESPACE)
                    .to_owned(),
            });
        }
        if let Some((scheme, _)) = store.split_once("://") {
            return Err(format!(
                "{scheme}:// URLs are not supported; STORE is a store's directory or a redis:// or rediss:// URL"
            )
            .into());
        }
        Ok(Target::Dir(PathBuf::from(store)))
    }

    pub(crate) fn is_redis(&self) -> bool {
        matches!(self, Target::Redis { .. })
    }

    /// "/srv/messages", or the URL (password hidden) and namespace.
    pub(crate) fn place(&self) -> String {
        match self {
            Target::Dir(path) => path.display().to_string(),
            Target::Redis { url, namespace } => {
                format!("{} (namespace {namespace:?})", redact(url))
            }
        }
    }

    /// "the store at /srv/messages", for sentences.
    pub(crate) fn describe(&self) -> String {
        match self {
            Target::Dir(path) => format!("the store at {}", path.display()),
            Target::Redis { url, namespace } => {
                format!(
                    "the Redis store at {} (namespace {namespace:?})",
                    redact(url)
                )
            }
        }
    }

    /// Opens a store that must exist already: a read command never creates
    /// one (sled would, on any path it is given).
    pub(crate) fn open_existing(&self) -> Result<MessageStore, Failure> {
        if let Target::Dir(path) = self {
            match dir_state(path)? {
                DirState::Store => {}
                DirState::Missing => {
                    return Err(format!(
                        "there is no message store at {}: nothing exists at that path; check it (only `send` and `import` create a store)",
                        path.display()
                    )
                    .into());
                }
                DirState::NotADirectory => return Err(not_a_directory(path)),
                DirState::Empty | DirState::Other => {
                    return Err(format!(
                        "{} is a directory but not a message store (it holds none of a store's files); check the path",
                        path.display()
                    )
                    .into());
                }
            }
        }
        // Opening a directory store takes in its spool under this handle's
        // rules; the lowest minimum level loses nothing the app might keep.
        self.open(MessageStore::builder().min_level(Level::Debug))
    }

    /// Opens the store for `import`, creating it in a new or empty directory.
    /// Writes are made durable by the caller's [`MessageStore::flush`], once.
    pub(crate) fn open_or_create(&self) -> Result<MessageStore, Failure> {
        if let Target::Dir(path) = self {
            self.check_creatable(path)?;
        }
        self.open(
            MessageStore::builder()
                // An export holds what its store kept, debug messages too.
                .min_level(Level::Debug)
                .durability(Durability::Periodic(Duration::from_secs(1))),
        )
    }

    /// The spool for `send`: a directory store's (created if missing), or
    /// Redis directly.
    pub(crate) fn spool(&self) -> Result<Spool, Failure> {
        match self {
            Target::Dir(path) => {
                self.check_creatable(path)?;
                Spool::open(path).map_err(|e| self.failure(e))
            }
            Target::Redis { url, namespace } => {
                Spool::redis(url, namespace).map_err(|e| self.failure(e))
            }
        }
    }

    fn open(&self, builder: async_messages::Builder) -> Result<MessageStore, Failure> {
        let builder = match self {
            Target::Dir(path) => builder.path(path).lock_timeout(LOCK_TIMEOUT),
            Target::Redis { url, namespace } => builder.redis(url).namespace(namespace),
        };
        builder.open().map_err(|e| self.failure(e))
    }

    /// A store may be created at `path`: nothing is there, or an empty
    /// directory, or a store already.
    fn check_creatable(&self, path: &Path) -> Result<(), Failure> {
        match dir_state(path)? {
            DirState::Missing | DirState::Empty | DirState::Store => Ok(()),
            DirState::NotADirectory => Err(not_a_directory(path)),
            DirState::Other => Err(format!(
                "{} is a directory with other files in it, not a message store; give the store's own directory (a new store is made only in a new or empty directory)",
                path.display()
            )
            .into()),
        }
    }

    /// The sentence for a library error met while working on this store.
    pub(crate) fn failure(&self, error: Error) -> Failure {
        Failure::Said(match error {
            Error::AlreadyOpen { path } => format!(
                "the store at {} is open in another process (the app, most likely), and a directory store can be open in one process at a time; stop that process and run this command again, or read the messages through the app (`async-messages send` works while it runs)",
                path.display()
            ),
            Error::MessageTooLarge { size, limit } => format!(
                "the message is {size} bytes, over the limit of {limit} bytes; nothing was stored"
            ),
            Error::NotADirectory { path } => return not_a_directory(&path),
            other => other.to_string(),
        })
    }
}

fn not_a_directory(path: &Path) -> Failure {
    format!(
        "{} is not a directory, so it cannot be a message store (a store is a directory); nothing was changed",
        path.display()
    )
    .into()
}

fn dir_state(path: &Path) -> Result<DirState, Failure> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DirState::Missing),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display()).into()),
    };
    if !meta.is_dir() {
        return Ok(DirState::NotADirectory);
    }
    // sled's configuration and log files, the store's clean-close mark, the
    // spool.
    let marks = ["conf", "db", "async-messages.clean", "spool"];
    if marks.iter().any(|mark| path.join(mark).exists()) {
        return Ok(DirState::Store);
    }
    let mut entries =
        std::fs::read_dir(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(if entries.next().is_none() {
        DirState::Empty
    } else {
        DirState::Other
    })
}

/// Reads USER: digits are an integer id, anything else a string id.
pub(crate) fn user_id(user: &str, string_id: bool) -> Result<UserId, Failure> {
    if !string_id && !user.is_empty() && user.bytes().all(|b| b.is_ascii_digit()) {
        return user.parse().map(UserId::Int).map_err(|_| {
            format!(
                "USER {user} is made of digits but is larger than the largest integer id, {}; add --string-id to use it as a string id",
                u64::MAX
            )
            .into()
        });
    }
    if user.len() > UserId::MAX_STR_BYTES {
        return Err(format!(
            "USER is {} bytes long, over the limit of {} bytes for a string id",
            user.len(),
            UserId::MAX_STR_BYTES
        )
        .into());
    }
    Ok(UserId::Str(user.to_owned()))
}

/// `url` with any password replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let hidden = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_owned(),
            };
            format!("{scheme}://{hidden}@{host}{path}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_of_digits_are_integers_unless_forced() {
        assert!(matches!(user_id("42", false), Ok(UserId::Int(42))));
        assert!(matches!(user_id("007", false), Ok(UserId::Int(7))));
        assert!(matches!(user_id("42", true), Ok(UserId::Str(s)) if s == "42"));
        assert!(matches!(user_id("alice", false), Ok(UserId::Str(s)) if s == "alice"));
        assert!(matches!(user_id("-5", false), Ok(UserId::Str(s)) if s == "-5"));
        assert!(matches!(user_id("", false), Ok(UserId::Str(s)) if s.is_empty()));
        assert!(matches!(
            user_id("18446744073709551615", false),
            Ok(UserId::Int(u64::MAX))
        ));
        assert!(user_id("18446744073709551616", false).is_err());
        assert!(user_id(&"x".repeat(1025), false).is_err());
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(redact("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact("rediss://app:pw@h/1"), "rediss://app:***@h/1");
        assert_eq!(redact("redis://token@h"), "redis://***@h");
    }

    #[test]
    fn store_urls_and_directories() {
        assert!(matches!(Target::parse("/srv/m", None), Ok(Target::Dir(_))));
        assert!(Target::parse("", None).is_err());
        assert!(Target::parse("http://x", None).is_err());
        assert_eq!(
            Target::parse("redis://h/0", Some("ns")).is_ok(),
            cfg!(feature = "redis")
        );
    }
}
