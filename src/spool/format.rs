//! The spool's files: their format, their names and directories, and the
//! checks that decide whether the store trusts one (see the parent module).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::fs::{io_error, sync_dir};
use crate::{Level, Result, UserId, key};

/// The spool file format this library writes. Version 2 adds an expiry, a
/// replace key and announcements; version 1 files (written by an earlier
/// release, perhaps still waiting in a spool) are still read.
const SPOOL_VERSION: u8 = 2;
/// The oldest spool file format this library reads.
const OLDEST_SPOOL_VERSION: u8 = 1;
const MAGIC: &[u8; 4] = b"AMSP";
/// Files larger than this are refused unread (the largest message and many
/// thousands of recipients fit well below it).
pub(crate) const MAX_FILE_BYTES: u64 = 64 << 20;

/// One spooled send, as written in a spool file (version 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// The recipients; empty for an announcement.
    pub(crate) users: Vec<SpoolUser>,
    pub(crate) level: u8,
    pub(crate) text: String,
    /// The sender's clock, in milliseconds since the Unix epoch.
    pub(crate) sent_at_ms: u64,
    /// When it expires (the sender's clock, milliseconds since the Unix
    /// epoch). `None`: the store's default expiry applies, unless
    /// `never_expires`.
    pub(crate) expires_at_ms: Option<u64>,
    /// Kept until delivered, whatever the store's default expiry says
    /// (`Draft::never_expires`). Only with `expires_at_ms == None`.
    pub(crate) never_expires: bool,
    /// Replaces the recipient's queued messages with the same key.
    pub(crate) replace_key: Option<String>,
    /// An announcement to every user (`users` is empty).
    pub(crate) everyone: bool,
}

/// One spooled send in a version 1 file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EntryV1 {
    pub(crate) users: Vec<SpoolUser>,
    pub(crate) level: u8,
    pub(crate) text: String,
    pub(crate) sent_at_ms: u64,
}

impl From<EntryV1> for Entry {
    fn from(old: EntryV1) -> Entry {
        Entry {
            users: old.users,
            level: old.level,
            text: old.text,
            sent_at_ms: old.sent_at_ms,
            expires_at_ms: None,
            never_expires: false,
            replace_key: None,
            everyone: false,
        }
    }
}

/// A user id in a spool file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum SpoolUser {
    Int(u64),
    Str(String),
}

impl From<&UserId> for SpoolUser {
    fn from(user: &UserId) -> Self {
        match user {
            UserId::Int(id) => SpoolUser::Int(*id),
            UserId::Str(name) => SpoolUser::Str(name.clone()),
        }
    }
}

impl From<SpoolUser> for UserId {
    fn from(user: SpoolUser) -> Self {
        match user {
            SpoolUser::Int(id) => UserId::Int(id),
            SpoolUser::Str(name) => UserId::Str(name),
        }
    }
}

fn fnv64(bytes: &[u8]) -> u64 {
    key::prefix_hash(bytes)
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_FILE_BYTES as usize }>()
}

pub(crate) fn encode(entry: &Entry) -> Vec<u8> {
    encode_version(SPOOL_VERSION, entry)
}

/// A spool file of format `version` holding `body` (tests write older ones).
fn encode_version(version: u8, body: &impl Serialize) -> Vec<u8> {
    let mut bytes = vec![version];
    bytes.extend_from_slice(MAGIC);
    if let Ok(body) = bincode::serde::encode_to_vec(body, config()) {
        bytes.extend_from_slice(&body);
    }
    let sum = fnv64(&bytes);
    bytes.extend_from_slice(&sum.to_le_bytes());
    bytes
}

/// Decodes a spool file; the reason it cannot be trusted otherwise.
pub(crate) fn decode(bytes: &[u8]) -> std::result::Result<Entry, String> {
    if bytes.len() < 1 + MAGIC.len() + 8 {
        return Err("too short to be a spool file".to_owned());
    }
    let (body, sum) = bytes.split_at(bytes.len() - 8);
    if &body[1..5] != MAGIC {
        return Err("not a spool file (wrong magic)".to_owned());
    }
    let version = body[0];
    if !(OLDEST_SPOOL_VERSION..=SPOOL_VERSION).contains(&version) {
        return Err(format!(
            "spool format version {version} (this version reads {OLDEST_SPOOL_VERSION} to {SPOOL_VERSION})"
        ));
    }
    let expected = u64::from_le_bytes(sum.try_into().map_err(|_| "no checksum".to_owned())?);
    if fnv64(body) != expected {
        return Err("the checksum does not match: the file is damaged".to_owned());
    }
    let entry = if version == 1 {
        decode_body::<EntryV1>(&body[5..])?.into()
    } else {
        decode_body::<Entry>(&body[5..])?
    };
    if entry.text.is_empty() {
        return Err("the message text is empty".to_owned());
    }
    Level::from_value(entry.level).ok_or_else(|| format!("unknown level {}", entry.level))?;
    if let Some(replace_key) = &entry.replace_key {
        key::check_replace_key(replace_key).map_err(|e| e.to_string())?;
    }
    if entry.everyone && !entry.users.is_empty() {
        return Err("an announcement to everyone that also lists users".to_owned());
    }
    if entry.never_expires && entry.expires_at_ms.is_some() {
        return Err("both an expiry time and \"never expires\"".to_owned());
    }
    Ok(entry)
}

/// Decodes the entry after the header: all of it, nothing left over.
fn decode_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> std::result::Result<T, String> {
    let (entry, used) = bincode::serde::decode_from_slice::<T, _>(bytes, config())
        .map_err(|e| format!("the entry does not decode: {e}"))?;
    if used != bytes.len() {
        return Err("trailing bytes after the entry".to_owned());
    }
    Ok(entry)
}

/// The spool's directories under a store directory.
pub(crate) struct Dirs {
    pub(crate) root: PathBuf,
    pub(crate) tmp: PathBuf,
    pub(crate) new: PathBuf,
    pub(crate) rejected: PathBuf,
}

impl Dirs {
    pub(crate) fn of(store: &Path) -> Dirs {
        let root = store.join("spool");
        Dirs {
            tmp: root.join("tmp"),
            new: root.join("new"),
            rejected: root.join("rejected"),
            root,
        }
    }

    /// Creates the directories, owner-only, if missing.
    pub(crate) fn create(&self) -> Result<()> {
        for dir in [&self.root, &self.tmp, &self.new, &self.rejected] {
            match fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {
                    let parent = dir.parent().unwrap_or(Path::new("."));
                    sync_dir(parent)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error(dir, e)),
            }
        }
        Ok(())
    }
}

/// A name that sorts in send order within this process.
pub(crate) fn next_name() -> String {
    static LAST: AtomicU64 = AtomicU64::new(0);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let mut stamp = now;
    let _ = LAST.fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
        stamp = now.max(last + 1);
        Some(stamp)
    });
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{stamp:020}.{}.{counter}.msg", std::process::id())
}

/// Whether `name` is one this library writes.
pub(crate) fn is_spool_name(name: &str) -> bool {
    let mut parts = name.split('.');
    let (Some(stamp), Some(pid), Some(counter), Some("msg"), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    stamp.len() == 20
        && [stamp, pid, counter]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Reads a spool file that the store can trust; the reason otherwise.
pub(crate) fn read_trusted(dirs: &Dirs, name: &str) -> std::result::Result<Entry, String> {
    if !is_spool_name(name) {
        return Err("the file name is not one a spool writes".to_owned());
    }
    let path = dirs.new.join(name);
    let meta = fs::symlink_metadata(&path).map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.file_type().is_file() {
        return Err("not a regular file".to_owned());
    }
    let owner = fs::metadata(&dirs.root)
        .map_err(|e| format!("cannot read the spool directory: {e}"))?
        .uid();
    if meta.uid() != owner {
        return Err(format!(
            "owned by user {}, not by the spool's owner {owner}",
            meta.uid()
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{} bytes, over the limit of {MAX_FILE_BYTES}",
            meta.len()
        ));
    }
    let bytes = fs::read(&path).map_err(|e| format!("cannot read it: {e}"))?;
    decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            users: vec![SpoolUser::Int(7), SpoolUser::Str("ann".to_owned())],
            level: Level::Warning as u8,
            text: "Maintenance at 22:00".to_owned(),
            sent_at_ms: 1_735_689_600_000,
            expires_at_ms: Some(1_735_693_200_000),
            never_expires: false,
            replace_key: Some("maintenance".to_owned()),
            everyone: false,
        }
    }

    #[test]
    fn version_2_round_trips() {
        let entry = entry();
        let bytes = encode(&entry);
        assert_eq!(bytes[0], 2);
        assert_eq!(decode(&bytes), Ok(entry));
    }

    #[test]
    fn version_1_files_are_still_read() {
        let old = EntryV1 {
            users: vec![SpoolUser::Int(7)],
            level: Level::Info as u8,
            text: "from an earlier release".to_owned(),
            sent_at_ms: 5,
        };
        let bytes = encode_version(1, &old);
        let entry = decode(&bytes).expect("a version 1 file decodes");
        assert_eq!(entry, Entry::from(old));
        assert_eq!(entry.expires_at_ms, None);
        assert_eq!(entry.replace_key, None);
        assert!(!entry.everyone && !entry.never_expires);
        // A version 1 body under a version 2 header does not pass.
        assert!(decode(&encode_version(2, &entry_v1_like())).is_err());
    }

    fn entry_v1_like() -> EntryV1 {
        EntryV1 {
            users: vec![SpoolUser::Int(1)],
            level: Level::Info as u8,
            text: "x".to_owned(),
            sent_at_ms: 1,
        }
    }

    #[test]
    fn untrustworthy_entries_are_refused_with_a_reason() {
        let future = encode_version(3, &entry());
        assert!(decode(&future).is_err_and(|e| e.contains("version 3")));
        let mut damaged = encode(&entry());
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0x01;
        assert!(decode(&damaged).is_err_and(|e| e.contains("checksum")));
        for (change, reason) in [
            (
                (|e: &mut Entry| e.replace_key = Some(String::new())) as fn(&mut Entry),
                "replace key",
            ),
            (
                |e: &mut Entry| e.replace_key = Some("k".repeat(257)),
                "257 bytes",
            ),
            (|e: &mut Entry| e.everyone = true, "announcement"),
            (|e: &mut Entry| e.never_expires = true, "never expires"),
            (|e: &mut Entry| e.text.clear(), "empty"),
            (|e: &mut Entry| e.level = 99, "level 99"),
        ] {
            let mut bad = entry();
            change(&mut bad);
            let refused = decode(&encode(&bad));
            assert!(
                refused.as_ref().is_err_and(|e| e.contains(reason)),
                "{reason}: {refused:?}"
            );
        }
    }
}
