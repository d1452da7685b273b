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

/// The spool file format this library writes and reads.
const SPOOL_VERSION: u8 = 1;
const MAGIC: &[u8; 4] = b"AMSP";
/// Files larger than this are refused unread (the largest message and many
/// thousands of recipients fit well below it).
pub(crate) const MAX_FILE_BYTES: u64 = 64 << 20;

/// One spooled send, as written in a spool file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub(crate) users: Vec<SpoolUser>,
    pub(crate) level: u8,
    pub(crate) text: String,
    pub(crate) sent_at_ms: u64,
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
    let mut bytes = vec![SPOOL_VERSION];
    bytes.extend_from_slice(MAGIC);
    if let Ok(body) = bincode::serde::encode_to_vec(entry, config()) {
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
    if body[0] != SPOOL_VERSION {
        return Err(format!(
            "spool format version {} (this version reads {SPOOL_VERSION})",
            body[0]
        ));
    }
    let expected = u64::from_le_bytes(sum.try_into().map_err(|_| "no checksum".to_owned())?);
    if fnv64(body) != expected {
        return Err("the checksum does not match: the file is damaged".to_owned());
    }
    let (entry, used) = bincode::serde::decode_from_slice::<Entry, _>(&body[5..], config())
        .map_err(|e| format!("the entry does not decode: {e}"))?;
    if used != body.len() - 5 {
        return Err("trailing bytes after the entry".to_owned());
    }
    if entry.text.is_empty() {
        return Err("the message text is empty".to_owned());
    }
    Level::from_value(entry.level).ok_or_else(|| format!("unknown level {}", entry.level))?;
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
