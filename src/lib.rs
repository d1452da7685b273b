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
//! **Records.** Every value starts with a format version byte (now `1`),
//! then a bincode body: level, send time and text.
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
//! **What is kept.** Queued messages until drained; shared texts and bulk
//! records until their last recipient has drained; damaged records in the `quarantine` tree (see
//! [`MessageStore::quarantined`]). Drained messages are removed, and sled
//! reclaims their space as it rewrites its segments. At each clean close
//! the store writes its record counts to `async-messages.clean` beside
//! sled's files; `open` refuses with [`Error::DataLoss`] when fewer records
//! come back (sled silently drops a damaged stretch of its log).
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
