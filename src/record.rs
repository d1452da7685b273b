//! The value codec: every stored value starts with a format version byte,
//! followed by a bincode body.
//!
//! ```text
//! message record:  FORMAT_VERSION ‖ bincode(StoredMessage)
//! shared text:     FORMAT_VERSION ‖ bincode(SharedText)
//! bulk record:     FORMAT_VERSION ‖ bincode(BulkHeader) ‖ roaring treemap
//! ```
//!
//! A message sent to at most 256 users is stored once, as a shared text
//! keyed by the send's id; each recipient's record is then the two bytes
//! `FORMAT_VERSION ‖ Shared`, and the text id is the key's sequence number.
//! A larger send is one bulk record (see `bulk.rs`); a user who took it has
//! a `Taken` record under the bulk's id, listing the records its drain
//! removed.
//!
//! Decoding never panics and never allocates more than the input's length.

use serde::{Deserialize, Serialize};

use crate::Level;
use crate::message::Outgoing;
use crate::recipients::Recipients;

/// The newest record format this library writes and reads. Version 2 added
/// an expiry time and a replace key to messages, shared texts and bulk
/// records, and "everyone" bulk records (announcements); version 1 records
/// are still read.
pub(crate) const FORMAT_VERSION: u8 = 2;

/// Decoders refuse to allocate past this many bytes, whatever a damaged
/// length prefix claims.
const DECODE_LIMIT: usize = 32 << 20;

/// Version 1 bodies, read but no longer written.
mod v1 {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    pub(super) enum StoredMessage {
        Inline {
            level: u8,
            sent_at_ms: u64,
            text: String,
        },
        Shared,
        Taken {
            removed: Vec<u64>,
        },
    }

    #[derive(Serialize, Deserialize)]
    pub(super) struct SharedText {
        pub(super) level: u8,
        pub(super) sent_at_ms: u64,
        pub(super) text: String,
    }

    #[derive(Serialize, Deserialize)]
    pub(super) struct BulkHeader {
        pub(super) level: u8,
        pub(super) sent_at_ms: u64,
        pub(super) text: String,
        pub(super) strs: Vec<String>,
    }
}

/// A message's contents as stored (version 2).
#[derive(Serialize, Deserialize)]
struct Body {
    level: u8,
    sent_at_ms: u64,
    /// Milliseconds since the Unix epoch; `None` keeps it until delivered.
    expires_at_ms: Option<u64>,
    replace_key: Option<String>,
    text: String,
}

impl Body {
    fn of(message: &Outgoing) -> Body {
        Body {
            level: message.level as u8,
            sent_at_ms: message.sent_at_ms,
            expires_at_ms: message.expires_at_ms,
            replace_key: message.replace_key.clone(),
            text: message.text.clone(),
        }
    }

    fn outgoing(self) -> Result<Outgoing, String> {
        if let Some(key) = &self.replace_key {
            crate::key::check_replace_key(key).map_err(|e| format!("a bad replace key: {e}"))?;
        }
        Ok(Outgoing {
            level: level(self.level)?,
            sent_at_ms: self.sent_at_ms,
            expires_at_ms: self.expires_at_ms,
            replace_key: self.replace_key,
            text: self.text,
        })
    }
}

#[derive(Serialize, Deserialize)]
enum StoredMessage {
    Inline(Body),
    Shared,
    Taken { removed: Vec<u64> },
}

/// A decoded message record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Record {
    /// The message is in the record.
    Inline(Outgoing),
    /// The message is the shared text whose id is the key's sequence number.
    Shared,
    /// A taken mark: the user has taken the bulk record whose id is the
    /// key's sequence number, in a drain that also removed the user's
    /// records with these sequence numbers (the mark is written first and
    /// commits the drain; recovery finishes removals a crash cut off).
    Taken { removed: Vec<u64> },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    // Encoding into a Vec cannot fail for these plain structs; an error
    // here would be a bincode bug, and is reported as an empty body, which
    // the decoder then refuses rather than a panic in the write path.
    if let Ok(bytes) = bincode::serde::encode_to_vec(body, config()) {
        out.extend_from_slice(&bytes);
    }
    out
}

/// The format version and the body after it, for versions this library reads.
fn body(bytes: &[u8]) -> Result<(u8, &[u8]), String> {
    let (&version, body) = bytes
        .split_first()
        .ok_or_else(|| "the record is empty".to_owned())?;
    if version == 0 || version > FORMAT_VERSION {
        return Err(format!(
            "format version {version}, but this library reads versions 1 to {FORMAT_VERSION}"
        ));
    }
    Ok((version, body))
}

/// Decodes a whole body (nothing may follow it).
fn decode_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(body, config())
        .map_err(|e| format!("the record does not decode: {e}"))?;
    if used != body.len() {
        return Err(format!(
            "{} unexpected bytes after the record",
            body.len() - used
        ));
    }
    Ok(value)
}

fn level(value: u8) -> Result<Level, String> {
    Level::from_value(value).ok_or_else(|| format!("unknown level {value}"))
}

/// A message kept in its user's record.
pub(crate) fn encode_inline(message: &Outgoing) -> Vec<u8> {
    encode(&StoredMessage::Inline(Body::of(message)))
}

/// The value of every recipient's record of a bulk send.
pub(crate) fn encode_shared() -> Vec<u8> {
    encode(&StoredMessage::Shared)
}

pub(crate) fn decode_record(bytes: &[u8]) -> Result<Record, String> {
    let (version, body) = body(bytes)?;
    if version == 1 {
        return Ok(match decode_body::<v1::StoredMessage>(body)? {
            v1::StoredMessage::Inline {
                level: value,
                sent_at_ms,
                text,
            } => Record::Inline(Outgoing {
                level: level(value)?,
                sent_at_ms,
                expires_at_ms: None,
                replace_key: None,
                text,
            }),
            v1::StoredMessage::Shared => Record::Shared,
            v1::StoredMessage::Taken { removed } => Record::Taken { removed },
        });
    }
    Ok(match decode_body::<StoredMessage>(body)? {
        StoredMessage::Inline(body) => Record::Inline(body.outgoing()?),
        StoredMessage::Shared => Record::Shared,
        StoredMessage::Taken { removed } => Record::Taken { removed },
    })
}

/// The value of a taken mark, listing the records its drain removes.
pub(crate) fn encode_taken(removed: &[u64]) -> Vec<u8> {
    encode(&StoredMessage::Taken {
        removed: removed.to_vec(),
    })
}

#[derive(Serialize, Deserialize)]
struct BulkHeader {
    body: Body,
    /// `true` for an announcement: every user is a recipient except those
    /// in the set (who have taken it).
    everyone: bool,
    /// Sorted, without duplicates.
    strs: Vec<String>,
}

/// A decoded bulk record.
#[derive(Debug, PartialEq)]
pub(crate) struct BulkRecord {
    pub(crate) message: Outgoing,
    /// An announcement: `recipients` lists the users who took it, and
    /// every other user is a recipient.
    pub(crate) everyone: bool,
    pub(crate) recipients: Recipients,
}

/// `FORMAT_VERSION ‖ bincode(message, everyone, string ids) ‖ roaring
/// treemap of the integer ids` (the roaring format is portable and specified).
pub(crate) fn encode_bulk(message: &Outgoing, everyone: bool, recipients: &Recipients) -> Vec<u8> {
    let mut out = encode(&BulkHeader {
        body: Body::of(message),
        everyone,
        strs: recipients.strs.clone(),
    });
    out.reserve(recipients.ints.serialized_size());
    // Writing into a Vec cannot fail.
    let _ = recipients.ints.serialize_into(&mut out);
    out
}

pub(crate) fn decode_bulk(bytes: &[u8]) -> Result<BulkRecord, String> {
    let (version, body) = body(bytes)?;
    let decoded = if version == 1 {
        bincode::serde::decode_from_slice::<v1::BulkHeader, _>(body, config()).map(|(h, used)| {
            let header = BulkHeader {
                body: Body {
                    level: h.level,
                    sent_at_ms: h.sent_at_ms,
                    expires_at_ms: None,
                    replace_key: None,
                    text: h.text,
                },
                everyone: false,
                strs: h.strs,
            };
            (header, used)
        })
    } else {
        bincode::serde::decode_from_slice::<BulkHeader, _>(body, config())
    };
    let (header, used) = decoded.map_err(|e| format!("the bulk record does not decode: {e}"))?;
    let mut rest = body.get(used..).unwrap_or_default();
    let ints = roaring::RoaringTreemap::deserialize_from(&mut rest)
        .map_err(|e| format!("the bulk record's recipient set does not decode: {e}"))?;
    if !rest.is_empty() {
        return Err(format!(
            "{} unexpected bytes after the bulk record",
            rest.len()
        ));
    }
    if header.strs.windows(2).any(|w| w[0] >= w[1]) {
        return Err("the bulk record's string ids are not sorted".to_owned());
    }
    if let Some(long) = header
        .strs
        .iter()
        .find(|s| s.len() > crate::UserId::MAX_STR_BYTES)
    {
        return Err(format!("a string id of {} bytes", long.len()));
    }
    Ok(BulkRecord {
        message: header.body.outgoing()?,
        everyone: header.everyone,
        recipients: Recipients {
            ints,
            strs: header.strs,
        },
    })
}

/// A message stored once for a few recipients.
pub(crate) fn encode_text(message: &Outgoing) -> Vec<u8> {
    encode(&Body::of(message))
}

pub(crate) fn decode_text(bytes: &[u8]) -> Result<Outgoing, String> {
    let (version, body) = body(bytes)?;
    if version == 1 {
        let text = decode_body::<v1::SharedText>(body)?;
        return Ok(Outgoing {
            level: level(text.level)?,
            sent_at_ms: text.sent_at_ms,
            expires_at_ms: None,
            replace_key: None,
            text: text.text,
        });
    }
    decode_body::<Body>(body)?.outgoing()
}

/// The database-wide format marker kept in the meta tree.
pub(crate) fn decode_format(bytes: &[u8]) -> Option<u8> {
    match bytes {
        [version] => Some(*version),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(text: &str, expires_at_ms: Option<u64>, key: Option<&str>) -> Outgoing {
        Outgoing {
            level: Level::Warning,
            sent_at_ms: 5,
            expires_at_ms,
            replace_key: key.map(str::to_owned),
            text: text.to_owned(),
        }
    }

    #[test]
    fn records_round_trip() {
        for m in [
            message("hi", None, None),
            message("hi", Some(9), Some("report:42")),
        ] {
            assert_eq!(
                decode_record(&encode_inline(&m)),
                Ok(Record::Inline(m.clone()))
            );
            assert_eq!(decode_text(&encode_text(&m)), Ok(m));
        }
        assert_eq!(decode_record(&encode_shared()), Ok(Record::Shared));
        assert_eq!(
            decode_record(&encode_taken(&[3, 9])),
            Ok(Record::Taken {
                removed: vec![3, 9]
            })
        );
        let mut recipients = Recipients::default();
        for user in [
            crate::UserId::Int(3),
            "b".into(),
            "a".into(),
            crate::UserId::Int(u64::MAX),
        ] {
            recipients.push(user);
        }
        recipients.seal();
        let all = message("all", Some(7), None);
        for everyone in [false, true] {
            let bulk = decode_bulk(&encode_bulk(&all, everyone, &recipients));
            assert_eq!(
                bulk,
                Ok(BulkRecord {
                    message: all.clone(),
                    everyone,
                    recipients: recipients.clone(),
                })
            );
        }
    }

    #[test]
    fn version_1_records_are_read() {
        let v1 = |body: &dyn Fn() -> Vec<u8>| [vec![1], body()].concat();
        let inline = v1(&|| {
            bincode::serde::encode_to_vec(
                v1::StoredMessage::Inline {
                    level: 20,
                    sent_at_ms: 4,
                    text: "old".into(),
                },
                bincode::config::standard(),
            )
            .unwrap_or_default()
        });
        let Ok(Record::Inline(old)) = decode_record(&inline) else {
            panic!("a version 1 record does not decode: {inline:?}");
        };
        assert_eq!(
            (old.text.as_str(), old.expires_at_ms, old.replace_key),
            ("old", None, None)
        );
        let text = v1(&|| {
            bincode::serde::encode_to_vec(
                v1::SharedText {
                    level: 30,
                    sent_at_ms: 4,
                    text: "shared".into(),
                },
                bincode::config::standard(),
            )
            .unwrap_or_default()
        });
        assert_eq!(decode_text(&text).map(|m| m.level), Ok(Level::Warning));
    }

    #[test]
    fn bad_bytes_are_errors() {
        assert!(decode_record(&[]).is_err());
        assert!(decode_record(&[3, 1]).is_err());
        assert!(decode_record(&[1, 9]).is_err());
        assert!(decode_record(&[2, 9]).is_err());
        let mut trailing = encode_shared();
        trailing.push(0);
        assert!(decode_record(&trailing).is_err());
        // A length prefix claiming a huge string must fail, not allocate.
        assert!(decode_record(&[1, 0, 20, 5, 252, 255, 255, 255, 255]).is_err());
        // A replace key over the limit is damage, not a message.
        let long = message("x", None, Some(&"k".repeat(300)));
        assert!(decode_record(&encode_inline(&long)).is_err());
    }
}

/// A record that could not be decoded, moved aside by the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantinedRecord {
    pub(crate) tree: String,
    pub(crate) key: Vec<u8>,
    pub(crate) value: Vec<u8>,
    pub(crate) reason: String,
    pub(crate) at_ms: u64,
}

impl QuarantinedRecord {
    /// Where the record was: `"messages"`, `"texts"` or `"bulk"`.
    #[must_use]
    pub fn tree(&self) -> &str {
        &self.tree
    }

    /// The record's key, as it was stored.
    #[must_use]
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The record's value, as it was stored.
    #[must_use]
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// Why it could not be read.
    #[must_use]
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// When it was moved aside (milliseconds since the Unix epoch).
    #[must_use]
    pub fn quarantined_at_ms(&self) -> u64 {
        self.at_ms
    }
}

/// A quarantine entry: `FORMAT_VERSION ‖ bincode(QuarantinedRecord)`.
pub(crate) fn encode_quarantined(record: &QuarantinedRecord) -> Vec<u8> {
    let mut bytes = vec![FORMAT_VERSION];
    // Encoding these plain fields into a Vec cannot fail; if bincode ever
    // did, the entry would be an empty body, skipped by the decoder.
    if let Ok(body) = bincode::serde::encode_to_vec(record, bincode::config::standard()) {
        bytes.extend_from_slice(&body);
    }
    bytes
}

/// Decodes a quarantine entry; `None` unless `bytes` are exactly one entry
/// of this format version. Never allocates more than 64 MiB.
pub(crate) fn decode_quarantined(bytes: &[u8]) -> Option<QuarantinedRecord> {
    let (&FORMAT_VERSION, body) = bytes.split_first()? else {
        return None;
    };
    let (record, used) = bincode::serde::decode_from_slice::<QuarantinedRecord, _>(
        body,
        bincode::config::standard().with_limit::<{ 64 << 20 }>(),
    )
    .ok()?;
    (used == body.len()).then_some(record)
}
