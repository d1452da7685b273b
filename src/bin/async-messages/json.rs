//! The JSON the tool prints: stable field names, documented here, in
//! `--help` and in README's "Command-line tool" section. New fields may be
//! added; none is renamed or removed without a major version.

use std::time::{SystemTime, UNIX_EPOCH};

use async_messages::{Message, QuarantinedRecord, Stats, UserId};
use serde::Serialize;

pub(crate) const PEEK_HELP: &str = "\
JSON (--json): one object
  {\"user\": 42, \"messages\": [{\"id\": 12, \"level\": \"info\", \"text\": \"...\", \"sent_at_ms\": 1735689600000,
                                 \"expires_at_ms\": null, \"replace_key\": null}]}
  user        the user: a number for an integer id, a string for a string id
  messages    oldest first, as the user would get them (expired and replaced ones left out); for each:
    id             the id of the send (shared by every recipient of one send)
    level          debug, info, success, warning or error
    text           the text, exactly as sent (not escaped)
    sent_at_ms     when it was sent, in milliseconds since the Unix epoch
    expires_at_ms  when it expires, in milliseconds since the Unix epoch; null: kept until delivered
    replace_key    its replace key, or null";

pub(crate) const STATS_HELP: &str = "\
JSON (--json): one object
  {\"users\": 3, \"messages\": 305, \"bulk_records\": 1, \"size_on_disk\": 1318912, \"quarantined\": 0}
  users         users with at least one message queued
  messages      messages queued, once per recipient
  bulk_records  sends to more than 256 users, each stored as one record
  size_on_disk  bytes (0 on Redis)
  quarantined   damaged records moved to quarantine (see `check`)";

pub(crate) const EXPORT_HELP: &str = "\
Format: NDJSON, one object per line and per (user, message), in (user, send order) order
  {\"id\": 12, \"user\": 42, \"level\": \"info\", \"text\": \"...\", \"sent_at_ms\": 1735689600000,
   \"expires_at_ms\": null, \"replace_key\": null}
  id             the id of the send; lines of one send to many users share it
  user           a number for an integer id, a string for a string id
  level          debug, info, success, warning or error (import also takes 10 to 40)
  text           the text, exactly as sent
  sent_at_ms     when it was sent, in milliseconds since the Unix epoch
  expires_at_ms  when it expires, in milliseconds since the Unix epoch; null: kept until delivered
  replace_key    its replace key (at most 256 bytes), or null
Only messages a user would still get are exported (not expired, not replaced). An
announcement to everyone is exported as one line for each user the store knows who has
not had it yet (and imported as a send to those users).
Import refuses a line with any other field; `sent_at_ms`, `expires_at_ms` and `replace_key`
may be left out. It gives the messages new ids and send times (the store stamps a send when
it stores it) but keeps each expiry time: a message already expired is skipped, with a note.";

pub(crate) const CHECK_HELP: &str = "\
JSON (--json): one object
  {\"users\": 3, \"messages\": 305, \"bulk_records\": 1, \"size_on_disk\": 1318912,
   \"quarantined_now\": [...], \"quarantined_before\": [...]}
  users, messages, bulk_records, size_on_disk   as for `stats`
  quarantined_now     records this check found damaged and moved to quarantine
  quarantined_before  records already in quarantine when the check began
  each record: {\"tree\": \"messages\", \"key\": \"01…\" (hex), \"value_bytes\": 4,
                \"reason\": \"...\", \"quarantined_at_ms\": 1735689600000}";

/// A user id as JSON: a number or a string.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum JsonUser<'a> {
    Int(u64),
    Str(&'a str),
}

impl<'a> From<&'a UserId> for JsonUser<'a> {
    fn from(user: &'a UserId) -> Self {
        match user {
            UserId::Int(id) => JsonUser::Int(*id),
            UserId::Str(name) => JsonUser::Str(name),
        }
    }
}

/// One message of `peek --json`.
#[derive(Debug, Serialize)]
pub(crate) struct JsonMessage<'a> {
    pub(crate) id: u64,
    pub(crate) level: &'static str,
    pub(crate) text: &'a str,
    pub(crate) sent_at_ms: u64,
    pub(crate) expires_at_ms: Option<u64>,
    pub(crate) replace_key: Option<&'a str>,
}

impl<'a> From<&'a Message> for JsonMessage<'a> {
    fn from(message: &'a Message) -> Self {
        JsonMessage {
            id: message.id().get(),
            level: message.level().as_str(),
            text: message.text(),
            sent_at_ms: sent_at_ms(message),
            expires_at_ms: expires_at_ms(message),
            replace_key: message.replace_key(),
        }
    }
}

/// `peek --json`.
#[derive(Debug, Serialize)]
pub(crate) struct JsonQueue<'a> {
    pub(crate) user: JsonUser<'a>,
    pub(crate) messages: Vec<JsonMessage<'a>>,
}

/// One line of `export`.
#[derive(Debug, Serialize)]
pub(crate) struct ExportLine<'a> {
    pub(crate) id: u64,
    pub(crate) user: JsonUser<'a>,
    pub(crate) level: &'static str,
    pub(crate) text: &'a str,
    pub(crate) sent_at_ms: u64,
    pub(crate) expires_at_ms: Option<u64>,
    pub(crate) replace_key: Option<&'a str>,
}

/// `stats --json`.
#[derive(Debug, Serialize)]
pub(crate) struct JsonStats {
    pub(crate) users: u64,
    pub(crate) messages: u64,
    pub(crate) bulk_records: u64,
    pub(crate) size_on_disk: u64,
    pub(crate) quarantined: u64,
}

impl From<&Stats> for JsonStats {
    fn from(stats: &Stats) -> Self {
        JsonStats {
            users: stats.users,
            messages: stats.messages,
            bulk_records: stats.bulk_records,
            size_on_disk: stats.size_on_disk,
            quarantined: stats.quarantined,
        }
    }
}

/// `check --json`.
#[derive(Debug, Serialize)]
pub(crate) struct JsonCheck<'a> {
    pub(crate) users: u64,
    pub(crate) messages: u64,
    pub(crate) bulk_records: u64,
    pub(crate) size_on_disk: u64,
    pub(crate) quarantined_now: Vec<JsonQuarantined<'a>>,
    pub(crate) quarantined_before: Vec<JsonQuarantined<'a>>,
}

/// A quarantined record in `check --json`.
#[derive(Debug, Serialize)]
pub(crate) struct JsonQuarantined<'a> {
    pub(crate) tree: &'a str,
    pub(crate) key: String,
    pub(crate) value_bytes: usize,
    pub(crate) reason: &'a str,
    pub(crate) quarantined_at_ms: u64,
}

impl<'a> From<&'a QuarantinedRecord> for JsonQuarantined<'a> {
    fn from(record: &'a QuarantinedRecord) -> Self {
        JsonQuarantined {
            tree: record.tree(),
            key: hex(record.key()),
            value_bytes: record.value().len(),
            reason: record.reason(),
            quarantined_at_ms: record.quarantined_at_ms(),
        }
    }
}

pub(crate) fn sent_at_ms(message: &Message) -> u64 {
    millis(message.sent_at())
}

pub(crate) fn expires_at_ms(message: &Message) -> Option<u64> {
    message.expires_at().map(millis)
}

/// Milliseconds since the Unix epoch (0 before it).
fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// `value` as one line of JSON. Serialising these plain structs cannot
/// fail; should it, the line says so rather than panic.
pub(crate) fn to_line(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
}
