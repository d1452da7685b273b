//! The only module that talks to sled.
//!
//! Trees:
//! - `messages`: `user prefix ‖ seq` → message record (see `key` and `record`);
//! - `texts`: `id` → shared text of a small bulk send;
//! - `bulk`: `id` → a large bulk send: text and recipient set (see `bulk.rs`);
//! - `quarantine`: `id` → a damaged record moved out of the way;
//! - `expiry`: `expires_at_ms ‖ message key` → nothing: the records of
//!   `messages` that expire, in expiry order, so that the reaper reads only
//!   what is due. Written before its record and removed after it, so a
//!   crash can only leave an entry without a record (dropped when due);
//! - `meta`: `format` → the database's format version.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use sled::{IVec, Tree};

pub(crate) use crate::fs::{io_error, sync_dir};
use crate::record::{FORMAT_VERSION, QuarantinedRecord, decode_quarantined, encode_quarantined};
use crate::{Error, Result, record};

/// Raw bytes as sled hands them out (small values live inline, no allocation).
pub(crate) type Bytes = IVec;

/// How to open the database.
pub(crate) struct OpenOptions<'a> {
    pub(crate) path: &'a Path,
    pub(crate) cache_bytes: u64,
    pub(crate) flush_every: Option<Duration>,
    pub(crate) lock_timeout: Duration,
    pub(crate) disk_reserve: u64,
    /// Test-only: leave out the `fdatasync` in `flush`.
    pub(crate) skip_fdatasync: bool,
}

#[derive(Clone)]
pub(crate) struct Backend {
    db: sled::Db,
    messages: Tree,
    texts: Tree,
    bulk: Tree,
    quarantine: Tree,
    /// `expires_at_ms ‖ message key` for every record that expires.
    expiry: Tree,
    /// One key, written and removed again to make sled move its log on
    /// (see [`Backend::write_filler`]); empty otherwise.
    filler: Tree,
    /// Marks of spool files taken in (by file name), written atomically
    /// with their messages; removed once the file is gone.
    spooled: Tree,
    path: PathBuf,
    disk_reserve: u64,
    /// sled's log file, for the `fdatasync` sled leaves out (see `flush`).
    log_file: Arc<std::fs::File>,
    /// Test-only: `flush` leaves out that `fdatasync`.
    skip_fdatasync: bool,
    /// Set when a flush failed: sled cannot recover from that while open.
    poisoned: Arc<std::sync::atomic::AtomicBool>,
    /// The last free-space reading and when it was taken.
    free_space: Arc<Mutex<Option<(Instant, u64)>>>,
    /// Held by each flush: the group commit's leader, the maintenance
    /// thread and `MessageStore::flush` never run sled's flush at once.
    flush_lock: Arc<Mutex<()>>,
}

const FORMAT_KEY: &[u8] = b"format";
/// The file, beside sled's, that records the record counts at a clean close.
const CLEAN_MARK: &str = "async-messages.clean";

/// How many records each tree holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordCounts {
    pub(crate) messages: u64,
    pub(crate) texts: u64,
    pub(crate) bulk: u64,
}

fn is_lock_error(error: &sled::Error) -> bool {
    matches!(error, sled::Error::Io(e) if e.to_string().contains("could not acquire lock"))
}

fn storage_error(path: &Path, error: sled::Error) -> Error {
    match error {
        sled::Error::Io(source) => io_error(path, source),
        other => Error::Storage {
            path: path.to_path_buf(),
            source: Box::new(other),
        },
    }
}

impl Backend {
    /// Opens (or creates) the database, waiting up to `lock_timeout` for a
    /// lock that a just-dropped handle's background threads still hold.
    pub(crate) fn open(options: &OpenOptions<'_>) -> Result<Backend> {
        let path = options.path;
        let mut config = sled::Config::new()
            .path(path)
            .cache_capacity(options.cache_bytes)
            .mode(sled::Mode::LowSpace);
        if let Some(every) = options.flush_every {
            let ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1);
            config = config.flush_every_ms(Some(ms));
        } else {
            config = config.flush_every_ms(None);
        }
        let started = Instant::now();
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(e) if is_lock_error(&e) => {
                    if started.elapsed() >= options.lock_timeout {
                        return Err(Error::AlreadyOpen {
                            path: path.to_path_buf(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(storage_error(path, e)),
            }
        };
        let tree = |name: &str| db.open_tree(name).map_err(|e| storage_error(path, e));
        let backend = Backend {
            messages: tree("messages")?,
            texts: tree("texts")?,
            bulk: tree("bulk")?,
            quarantine: tree("quarantine")?,
            expiry: tree("expiry")?,
            filler: tree("filler")?,
            spooled: tree("spooled")?,
            path: path.to_path_buf(),
            disk_reserve: options.disk_reserve,
            log_file: Arc::new(
                std::fs::File::open(path.join("db")).map_err(|e| io_error(path, e))?,
            ),
            skip_fdatasync: options.skip_fdatasync,
            poisoned: Arc::default(),
            free_space: Arc::new(Mutex::new(None)),
            flush_lock: Arc::default(),
            db: db.clone(),
        };
        backend.check_format(&tree("meta")?)?;
        // A new store's files must survive a power loss too.
        sync_dir(path)?;
        Ok(backend)
    }

    fn check_format(&self, meta: &Tree) -> Result<()> {
        match meta.get(FORMAT_KEY).map_err(|e| self.err(e))? {
            None => {
                meta.insert(FORMAT_KEY, &[FORMAT_VERSION])
                    .map_err(|e| self.err(e))?;
                Ok(())
            }
            Some(bytes) => match record::decode_format(&bytes) {
                Some(found) if found == FORMAT_VERSION => Ok(()),
                // An older store: this release writes records the older
                // one cannot read, so the marker moves up first, and the
                // older release then refuses the store instead of taking
                // new records for damage.
                Some(found) if found < FORMAT_VERSION && found > 0 => {
                    meta.insert(FORMAT_KEY, &[FORMAT_VERSION])
                        .map_err(|e| self.err(e))?;
                    meta.flush().map_err(|e| self.err(e))?;
                    Ok(())
                }
                Some(found) => Err(Error::UnsupportedFormat {
                    path: self.path.clone(),
                    found,
                    supported: FORMAT_VERSION,
                }),
                None => Err(Error::Corrupt {
                    what: format!("holding the format version of {}", self.path.display()),
                    reason: format!("{} bytes where one was expected", bytes.len()),
                }),
            },
        }
    }

    /// Maps a sled error; an I/O error poisons the handle (see [`Backend::flush`]).
    fn err(&self, error: sled::Error) -> Error {
        if matches!(error, sled::Error::Io(_)) {
            self.poisoned
                .store(true, std::sync::atomic::Ordering::Release);
        }
        storage_error(&self.path, error)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses a new write with [`Error::DiskFull`] while the disk holding
    /// the store has less than the reserve free. sled 0.34 does not survive
    /// running out of space (after a failed log write every later flush,
    /// including the one on drop, hangs), so the store stops accepting sends
    /// while there is still room, and stays healthy: sends work again once
    /// space is freed. Drains are not checked: they free space.
    pub(crate) fn check_space(&self) -> Result<()> {
        if self.disk_reserve == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut last = self.free_space.lock();
        // Trust a recent reading only while it is far from the reserve.
        let cached = last.filter(|(at, free)| {
            now.duration_since(*at) < Duration::from_millis(10) && *free / 4 >= self.disk_reserve
        });
        let free = match cached {
            Some((_, free)) => free,
            None => {
                let free = fs2::available_space(&self.path).map_err(|e| io_error(&self.path, e))?;
                *last = Some((now, free));
                free
            }
        };
        if free < self.disk_reserve {
            return Err(Error::DiskFull {
                path: self.path.clone(),
                source: io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!(
                        "{free} bytes free, below the {} bytes kept in reserve so that the store stays writable",
                        self.disk_reserve
                    ),
                ),
            });
        }
        Ok(())
    }

    /// A new id, greater than every id handed out before, also across restarts.
    pub(crate) fn next_id(&self) -> Result<u64> {
        self.db.generate_id().map_err(|e| self.err(e))
    }

    /// Inserts a record; `true` if the key was new.
    pub(crate) fn insert_message(&self, key: &[u8], value: &[u8]) -> Result<bool> {
        self.check_poisoned()?;
        self.messages
            .insert(key, value)
            .map(|previous| previous.is_none())
            .map_err(|e| self.err(e))
    }

    pub(crate) fn remove_message(&self, key: &[u8]) -> Result<()> {
        self.check_poisoned()?;
        self.messages.remove(key).map(drop).map_err(|e| self.err(e))
    }

    pub(crate) fn remove_messages(&self, keys: &[impl AsRef<[u8]>]) -> Result<()> {
        keys.iter()
            .try_for_each(|key| self.remove_message(key.as_ref()))
    }

    /// Every record of one user, in key order.
    pub(crate) fn scan(&self, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>> {
        self.messages
            .scan_prefix(prefix)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))
    }

    /// All message records, for recovery at open.
    pub(crate) fn all_messages(&self) -> impl Iterator<Item = Result<(Bytes, Bytes)>> + '_ {
        self.messages
            .iter()
            .map(|item| item.map_err(|e| self.err(e)))
    }

    /// All shared texts, for recovery at open.
    pub(crate) fn all_texts(&self) -> impl Iterator<Item = Result<(Bytes, Bytes)>> + '_ {
        self.texts.iter().map(|item| item.map_err(|e| self.err(e)))
    }

    pub(crate) fn get_text(&self, id: u64) -> Result<Option<Bytes>> {
        self.texts
            .get(crate::key::text_key(id))
            .map_err(|e| self.err(e))
    }

    pub(crate) fn insert_text(&self, id: u64, value: &[u8]) -> Result<()> {
        self.check_poisoned()?;
        self.texts
            .insert(crate::key::text_key(id), value)
            .map(drop)
            .map_err(|e| self.err(e))
    }

    pub(crate) fn remove_text(&self, key: &[u8]) -> Result<()> {
        self.texts.remove(key).map(drop).map_err(|e| self.err(e))
    }

    /// Stores a bulk record (one insert: sled writes it atomically).
    /// Writes a spooled send's records (`messages`) and the mark naming its
    /// spool file (`spooled`) in one transaction: both or neither.
    pub(crate) fn insert_spooled(
        &self,
        records: &[(Vec<u8>, Vec<u8>)],
        bulk: Option<(u64, &[u8])>,
        mark: &[u8],
    ) -> Result<()> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        self.check_poisoned()?;
        // Expiring records get their `expiry` entry in the same transaction.
        let expiring: Vec<Vec<u8>> = records
            .iter()
            .filter_map(|(key, value)| match record::decode_record(value) {
                Ok(record::Record::Inline(message)) => {
                    message.expires_at_ms.map(|at| expiry_key(at, key))
                }
                _ => None,
            })
            .collect();
        let result = (&self.messages, &self.bulk, &self.spooled, &self.expiry).transaction(
            |(messages, bulk_tree, spooled, expiry)| {
                for entry in &expiring {
                    expiry.insert(entry.as_slice(), &[][..])?;
                }
                for (key, value) in records {
                    messages.insert(key.as_slice(), value.as_slice())?;
                }
                if let Some((id, value)) = bulk {
                    bulk_tree.insert(&crate::key::text_key(id), value)?;
                }
                spooled.insert(mark, &[][..])?;
                Ok::<(), ConflictableTransactionError<()>>(())
            },
        );
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(self.err(e)),
            Err(TransactionError::Abort(())) => Err(Error::Storage {
                path: self.path.clone(),
                source: "a spool intake transaction was aborted".into(),
            }),
        }
    }

    pub(crate) fn is_spooled(&self, mark: &[u8]) -> Result<bool> {
        self.spooled.contains_key(mark).map_err(|e| self.err(e))
    }

    pub(crate) fn remove_spooled(&self, mark: &[u8]) -> Result<()> {
        self.check_poisoned()?;
        self.spooled.remove(mark).map(drop).map_err(|e| self.err(e))
    }

    /// Every spool mark, for the clean-up at open.
    pub(crate) fn all_spooled(&self) -> Result<Vec<Bytes>> {
        self.spooled
            .iter()
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| self.err(e))
    }

    pub(crate) fn insert_bulk(&self, id: u64, value: &[u8]) -> Result<()> {
        self.check_poisoned()?;
        self.bulk
            .insert(crate::key::text_key(id), value)
            .map(drop)
            .map_err(|e| self.err(e))
    }

    pub(crate) fn remove_bulk(&self, id: u64) -> Result<()> {
        self.check_poisoned()?;
        self.bulk
            .remove(crate::key::text_key(id))
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// All bulk records, for recovery at open.
    pub(crate) fn all_bulks(&self) -> impl Iterator<Item = Result<(Bytes, Bytes)>> + '_ {
        self.bulk.iter().map(|item| item.map_err(|e| self.err(e)))
    }

    /// One record, if it is there.
    pub(crate) fn get_message(&self, key: &[u8]) -> Result<Option<Bytes>> {
        self.messages.get(key).map_err(|e| self.err(e))
    }

    /// Notes that the record under `key` expires at `at_ms` (before the
    /// record is written).
    pub(crate) fn insert_expiry(&self, at_ms: u64, key: &[u8]) -> Result<()> {
        self.check_poisoned()?;
        self.expiry
            .insert(expiry_key(at_ms, key), &[][..])
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Writes the entry if it is missing; `true` if it was.
    pub(crate) fn ensure_expiry(&self, at_ms: u64, key: &[u8]) -> Result<bool> {
        let entry = expiry_key(at_ms, key);
        if self.expiry.contains_key(&entry).map_err(|e| self.err(e))? {
            return Ok(false);
        }
        self.check_poisoned()?;
        self.expiry
            .insert(entry, &[][..])
            .map_err(|e| self.err(e))?;
        Ok(true)
    }

    /// Removes an entry of the `expiry` tree (after its record).
    pub(crate) fn remove_expiry(&self, entry: &[u8]) -> Result<()> {
        self.check_poisoned()?;
        self.expiry.remove(entry).map(drop).map_err(|e| self.err(e))
    }

    /// Up to `limit` entries of the `expiry` tree due at `now_ms` (expiry
    /// time at most `now_ms`), in order, starting after `after`.
    pub(crate) fn due_expiries(
        &self,
        after: Option<&[u8]>,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Bytes>> {
        use std::ops::Bound;
        let start = match after {
            Some(key) => Bound::Excluded(key.to_vec()),
            None => Bound::Unbounded,
        };
        // Every key due at `now_ms` sorts before `now_ms + 1` followed by anything.
        let end = match now_ms.checked_add(1) {
            Some(next) => Bound::Excluded(next.to_be_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        self.expiry
            .range::<Vec<u8>, _>((start, end))
            .keys()
            .take(limit)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))
    }

    /// Writes about `bytes` to sled's log that are garbage at once (one key
    /// set and removed again), so that sled fills and closes its current
    /// segment: sled frees the segments it emptied only then, and moves
    /// data out of the file's tail only as later segments fill.
    pub(crate) fn write_filler(&self, bytes: u64) -> Result<()> {
        const CHUNK: u64 = 8 << 10;
        self.check_poisoned()?;
        let value = [0_u8; CHUNK as usize];
        for _ in 0..bytes.div_ceil(CHUNK) {
            self.filler
                .insert(b"filler", value.as_slice())
                .and_then(|_| self.filler.remove(b"filler"))
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Removes a record; `true` if it was there.
    pub(crate) fn take_message(&self, key: &[u8]) -> Result<bool> {
        self.check_poisoned()?;
        self.messages
            .remove(key)
            .map(|previous| previous.is_some())
            .map_err(|e| self.err(e))
    }

    /// Writes taken marks and removes drained records in one atomic batch
    /// (for a drain that takes several bulk messages: sled 0.34's batches
    /// cost a log buffer write, so a drain taking one uses a single mark
    /// that lists what it removes instead).
    pub(crate) fn apply_drain(
        &self,
        marks: &[impl AsRef<[u8]>],
        removed: &[impl AsRef<[u8]>],
    ) -> Result<()> {
        self.check_poisoned()?;
        let mut batch = sled::Batch::default();
        let taken = crate::record::encode_taken(&[]);
        for key in marks {
            batch.insert(key.as_ref(), taken.as_slice());
        }
        for key in removed {
            batch.remove(key.as_ref());
        }
        self.messages.apply_batch(batch).map_err(|e| self.err(e))
    }

    /// Moves a damaged record out of `tree` into the quarantine. The copy is
    /// written before the original is removed, so a crash in between leaves
    /// both (harmless) rather than neither.
    pub(crate) fn quarantine(
        &self,
        tree: &str,
        key: &[u8],
        value: &[u8],
        reason: &str,
    ) -> Result<()> {
        let record = QuarantinedRecord {
            tree: tree.to_owned(),
            key: key.to_vec(),
            value: value.to_vec(),
            reason: reason.to_owned(),
            at_ms: crate::message::now_ms(),
        };
        let bytes = encode_quarantined(&record);
        let id = self.next_id()?;
        self.quarantine
            .insert(id.to_be_bytes(), bytes)
            .map_err(|e| self.err(e))?;
        let source = match tree {
            "texts" => &self.texts,
            "bulk" => &self.bulk,
            _ => &self.messages,
        };
        source.remove(key).map(drop).map_err(|e| self.err(e))
    }

    /// The records moved to quarantine, oldest first. Entries that cannot be
    /// read themselves are skipped.
    pub(crate) fn quarantined(&self) -> Result<Vec<QuarantinedRecord>> {
        let mut out = Vec::new();
        for item in self.quarantine.iter().values() {
            let bytes = item.map_err(|e| self.err(e))?;
            out.extend(decode_quarantined(&bytes));
        }
        Ok(out)
    }

    /// Makes every write so far durable (one fsync, shared by all trees).
    ///
    /// After a failed write sled 0.34 can neither write nor close (its
    /// later flushes wait forever for the failed write), so the first I/O
    /// error poisons the handle: writes and flushes then fail at once with a
    /// typed error instead of hanging, and dropping the store does not wait.
    ///
    /// sled 0.34 ends its flush with `sync_file_range`, which neither empties
    /// the drive's write cache nor records the log file's new size, so on a
    /// power loss "flushed" data can still be lost. An `fdatasync` of the log
    /// file after sled's flush closes that gap.
    pub(crate) fn flush(&self) -> Result<()> {
        let _one_at_a_time = self.flush_lock.lock();
        self.check_poisoned()?;
        self.db.flush().map_err(|e| self.err(e))?;
        if self.skip_fdatasync {
            return Ok(());
        }
        self.log_file.sync_data().map_err(|e| {
            self.poisoned
                .store(true, std::sync::atomic::Ordering::Release);
            io_error(&self.path, e)
        })
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(std::sync::atomic::Ordering::Acquire)
    }

    fn check_poisoned(&self) -> Result<()> {
        if self.is_poisoned() {
            return Err(Error::Storage {
                path: self.path.clone(),
                source: "an earlier write to disk failed, and sled cannot recover from that while the store is open; fix the disk and restart the process".into(),
            });
        }
        Ok(())
    }

    pub(crate) fn clean_mark_path(&self) -> PathBuf {
        self.path.join(CLEAN_MARK)
    }

    /// The record counts written at the last clean close, if the store was
    /// closed cleanly since it was last opened. A mark that cannot be parsed
    /// is ignored (it only ever makes the check stricter).
    pub(crate) fn read_clean_mark(&self) -> Result<Option<RecordCounts>> {
        match std::fs::read(self.clean_mark_path()) {
            Ok(bytes) => Ok(parse_clean_mark(&bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&self.path, e)),
        }
    }

    /// Removes the mark once the store is open: from now on it changes.
    pub(crate) fn remove_clean_mark(&self) -> Result<()> {
        match std::fs::remove_file(self.clean_mark_path()) {
            Ok(()) => sync_dir(&self.path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(&self.path, e)),
        }
    }

    /// Writes the record counts beside sled's files, after the final flush.
    pub(crate) fn write_clean_mark(&self) -> Result<()> {
        let counts = RecordCounts {
            messages: self.messages.len() as u64,
            texts: self.texts.len() as u64,
            bulk: self.bulk.len() as u64,
        };
        let text = clean_mark_text(counts);
        let temporary = self.path.join(format!("{CLEAN_MARK}.tmp"));
        let write = || -> io::Result<()> {
            let mut file = std::fs::File::create(&temporary)?;
            io::Write::write_all(&mut file, text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temporary, self.clean_mark_path())
        };
        write().map_err(|e| io_error(&self.path, e))?;
        sync_dir(&self.path)
    }

    /// The database's size on disk, in bytes.
    pub(crate) fn size_on_disk(&self) -> Result<u64> {
        self.db.size_on_disk().map_err(|e| self.err(e))
    }
}

/// The key of an `expiry` entry: `expires_at_ms` (big-endian, so that the
/// tree is in expiry order) followed by the record's key.
pub(crate) fn expiry_key(at_ms: u64, key: &[u8]) -> Vec<u8> {
    let mut entry = Vec::with_capacity(8 + key.len());
    entry.extend_from_slice(&at_ms.to_be_bytes());
    entry.extend_from_slice(key);
    entry
}

/// Splits an `expiry` entry into the expiry time and the record's key.
pub(crate) fn split_expiry_key(entry: &[u8]) -> Option<(u64, &[u8])> {
    let (at, key) = entry.split_at_checked(8)?;
    Some((u64::from_be_bytes(at.try_into().ok()?), key))
}

/// The clean-close mark's text.
pub(crate) fn clean_mark_text(counts: RecordCounts) -> String {
    format!(
        "async-messages clean close v1 messages={} texts={} bulk={}\n",
        counts.messages, counts.texts, counts.bulk
    )
}

/// Parses a clean-close mark; `None` if it is not one (damaged, not UTF-8,
/// a count missing or not a number), and the caller then ignores it.
pub(crate) fn parse_clean_mark(bytes: &[u8]) -> Option<RecordCounts> {
    let text = std::str::from_utf8(bytes).ok()?;
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|part| part.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    };
    // `bulk` was added later: a mark without it counts none.
    Some(RecordCounts {
        messages: field("messages")?,
        texts: field("texts")?,
        bulk: field("bulk").unwrap_or(0),
    })
}
