#![doc = include_str!("../README.md")]
//!
//! # Design
//!
//! **Engines.** [`MessageStore`] keeps the rules every engine shares (levels,
//! size limits, user ids, the split between a send to a few users and a bulk
//! send) and hands each call to one engine behind an internal seam: sled
//! (embedded, the default, described below), Redis (feature `redis`; each
//! change is one Lua script, see README's "Several servers") and memory
//! ([`MessageStore::in_memory`]). The same test suite runs against each.
//!
//! **Key layout.** One sled tree, `messages`, holds each user's records under
//! `user ‖ sequence`, both big-endian, so byte order is (user, send order) and
//! one prefix scan reads one user's queue (bulk records, below, are merged in
//! by sequence number):
//!
//! ```text
//! integer user:  0x01 ‖ id: u64                     ‖ seq: u64
//! string user:   0x02 ‖ len: u32 ‖ UTF-8 bytes       ‖ seq: u64
//! ```
//!
//! The encoding is injective and prefix-free (no user's keys start with
//! another user's prefix). Sequence numbers come from sled's `generate_id`:
//! increasing, never reused, also across restarts.
//!
//! **Records.** Every value starts with a format version byte (now `2`),
//! then a bincode body: level, send time, expiry time, replace key and
//! text. Format 1 records (no expiry or key) are still read; opening a
//! format 1 store moves its marker to 2, so an older release refuses it
//! instead of mistaking new records for damage.
//!
//! **Bulk sends** are stored once. A send to more than 256 users writes one
//! record in the `bulk` tree: level, send time, text and the recipient set
//! (integer ids as a [roaring](https://roaringbitmap.org) bitmap, string ids
//! sorted), so its cost is the size of that set, not a write per recipient.
//! It takes its sequence number when it commits, under one lock, and is
//! delivered by membership (fan-out on read): a drain merges it with the
//! user's own records by sequence number and writes a small *taken mark*
//! under `user ‖ bulk id`, atomically with removing the user's drained
//! records: the mark lists them and is written first, one insert that
//! commits the drain, and recovery finishes removals a crash cut off (a
//! drain taking several bulk messages writes one sled batch). Marks do not pile up: once many recipients have taken a
//! record, a background thread rewrites it without them and then removes
//! their marks; once all have, the record goes too. The live records'
//! recipient sets are kept in memory (about 2 bytes per integer recipient,
//! less for runs of ids).
//!
//! A send to at most 256 users stores its text once in the `texts` tree;
//! each recipient's record is then two bytes, written one insert at a time
//! (sled 0.34 writes out its log buffer for every `Batch`), committed by
//! writing the text last: until then its records are invisible, and after a
//! crash or a failure they are rolled back.
//! The database's own format version is kept in the `meta` tree; a newer one
//! is refused with [`Error::UnsupportedFormat`].
//!
//! **An exactly-once drain, in order.** A drain holds a lock stripe for its user
//! while it scans and removes the records it read, so no other drain can see
//! them. An insert holds the same stripe for the moment of the insert (not
//! while waiting for the disk): sled's iterators are not snapshots, and a
//! scan running beside inserts could see a sender's second message without
//! its first. A crash in the middle of a drain (before it returned)
//! can remove some of its messages and leave the later ones queued; a drain
//! that returned is durable (with [`Durability::Immediate`]). This is the
//! store's drain; what a page gets depends on the [`DeliveryMode`]: at most
//! once by default, or at least once with a lease
//! ([`MessageStore::lease_messages`]). A lease only hides its messages, in
//! memory: a commit removes them, and a release, a drop or a crash puts them
//! back.
//!
//! **The empty queue** (most requests) is answered from memory: a fixed table
//! of counters indexed by a hash of the user, each an upper bound of that
//! slot's queued messages (a bulk send adds one to each recipient's slot, a
//! drain takes it off), rebuilt at open. Its size does not grow with users or
//! recipients.
//!
//! **When data reaches disk.** [`Durability::Immediate`] (the default): a send
//! or a drain returns after sled's flush and an `fdatasync` of its log file
//! (sled alone uses `sync_file_range`, which does not survive a power loss).
//! Concurrent callers share that flush (group commit, leader/follower on the
//! callers' own threads, no commit thread): the first caller to wait flushes
//! for every write made before the flush started, and the callers that
//! arrive meanwhile wait for it, then one of them leads the next flush. A
//! crash — kill -9 or power loss — loses nothing acknowledged, and no
//! acknowledged drain comes back. Writes not yet
//! acknowledged when the crash hits may or may not survive; a bulk send
//! survives whole or not at all. [`Durability::Periodic`]: sled writes in the
//! background every interval; kill -9 can lose sends acknowledged within the
//! last interval, and drained messages from that interval can be delivered
//! again; a power loss can lose everything since the last
//! [`MessageStore::flush`].
//!
//! **A full disk.** sled 0.34 cannot recover from a failed log write while
//! open (every later flush, including the one on drop, waits forever), so
//! the store keeps a reserve ([`Builder::disk_reserve`], default 8 MiB): below
//! it, sends fail with [`Error::DiskFull`] and store nothing, drains still
//! work, and sends succeed again once space is freed.
//!
//! **What is kept.** Queued messages until drained or expired; shared texts and bulk
//! records until their last recipient has drained; damaged records in the `quarantine` tree (see
//! [`MessageStore::quarantined`]). Drained messages are removed, and sled
//! reclaims their space as it rewrites its segments. At each clean close
//! the store writes its record counts to `async-messages.clean` beside
//! sled's files; `open` refuses with [`Error::DataLoss`] when fewer records
//! come back (sled silently drops a damaged stretch of its log).
//!
//! **Expiry, replace keys, announcements** ([`MessageStore::compose`]).
//! Records (format 2) carry an optional expiry time (wall clock, ms since
//! the Unix epoch, from the store's [`Clock`]) and replace key. Every engine
//! reads a user's queue through one rule: a message is shown unless it has
//! expired or a later message in the queue has its key; a drain removes the
//! unshown ones with the rest, unshown, and a lease takes them for its
//! commit to remove. On sled, each expiring record also has an entry in the
//! `expiry` tree (`expires_at_ms ‖ key`, written first), and the
//! maintenance thread reaps what is due every second without anyone
//! reading: records, shared texts, and bulk records and announcements as a
//! whole, keeping the index exact beside drains and leases. sled 0.34 frees
//! emptied log segments only when later writes fill new ones and shortens
//! its file only from the end, so a store that stopped writing would keep
//! its size; after a reap, while no one else writes, the reaper writes a
//! little filler (at most what it reaped) until the files are small again.
//! A keyed send removes the recipient's older queued copies with its key
//! once it is durable (the new record is written first, so a crash in
//! between leaves an old copy that the read rule hides), and takes their
//! untaken older keyed bulk and announcement copies (a taken mark, never
//! delivered). Before an expired keyed bulk send or announcement is reaped,
//! the older messages it replaced go too, so they stay replaced.
//! An announcement is a bulk record whose set lists the users who have
//! *taken* it (every other user is a recipient); it is not counted in the
//! index (it cannot count everyone), so the empty-queue check also asks
//! the in-memory list of live announcements. Takers' marks are folded into
//! the record like a bulk send's, and it lives until it expires.
//!
//! **Live delivery.** [`MessageStore::watch`] waits on one of 256 buckets
//! of waiters picked by a hash of the user ([`Watch`]); the store wakes a
//! user's bucket after a send is durable, every bucket after a bulk send or
//! an announcement, and the engines wake users whose messages come back
//! from a released lease or arrive through the spool. On Redis, sends
//! `PUBLISH` to the store's channel and a subscriber thread wakes the
//! buckets of this process.
//!
//! **One process.** sled locks the directory; a second open, in this process
//! or another, gets [`Error::AlreadyOpen`]. Reopening right after the last
//! handle is dropped waits (up to [`Builder::lock_timeout`]) for sled's
//! background threads to let go.
#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod clock;
mod engine;
mod error;
mod fs;
#[cfg(test)]
mod fuzz_tests;
mod hook;
mod key;
#[cfg(feature = "axum")]
mod layer;
mod level;
mod live;
mod message;
mod recipients;
mod record;
mod spool;
#[cfg(feature = "axum")]
mod sse;
mod store;
mod user;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, Result};
pub use hook::{Delivery, DeliveryMode, DrainPolicy, RequestHook, RequestKind};
#[cfg(feature = "axum")]
pub use layer::{Messages, MessagesLayer, MessagesService, MissingMessagesLayer};
pub use level::Level;
pub use live::Watch;
pub use message::{BulkSend, Message, MessageId, Progress};
pub use record::QuarantinedRecord;
pub use spool::{Spool, SpoolDraft};
#[cfg(feature = "axum")]
pub use sse::LiveMessages;
pub use store::{Builder, Draft, Durability, Lease, MessageStore, Stats};
pub use user::UserId;
