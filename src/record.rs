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
use crate::recipients::Recipients;

/// The newest record format this library writes and reads.
pub(crate) const FORMAT_VERSION: u8 = 1;

/// Decoders refuse to allocate past this many bytes, whatever a damaged
/// length prefix claims.
const DECODE_LIMIT: usize = 32 << 20;

#[derive(Serialize, Deserialize)]
enum StoredMessage {
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
struct SharedText {
    level: u8,
    sent_at_ms: u64,
    text: String,
}

/// A decoded message record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Record {
    /// The text is in the record.
    Inline {
        level: Level,
        sent_at_ms: u64,
        text: String,
    },
    /// The text is the shared text whose id is the key's sequence number.
    Shared,
    /// A taken mark: the user has taken the bulk record whose id is the
    /// key's sequence number, in a drain that also removed the user's
    /// records with these sequence numbers (the mark is written first and
    /// commits the drain; recovery finishes removals a crash cut off).
    Taken { removed: Vec<u64> },
}

/// A decoded shared text.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Text {
    pub(crate) level: Level,
    pub(crate) sent_at_ms: u64,
    pub(crate) text: String,
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

/// The body after a format version byte this library reads.
fn body(bytes: &[u8]) -> Result<&[u8], String> {
    let (&version, body) = bytes
        .split_first()
        .ok_or_else(|| "the record is empty".to_owned())?;
    if version == 0 || version > FORMAT_VERSION {
        return Err(format!(
            "format version {version}, but this library reads versions 1 to {FORMAT_VERSION}"
        ));
    }
    Ok(body)
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let body = body(bytes)?;
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

pub(crate) fn encode_inline(level: Level, sent_at_ms: u64, text: &str) -> Vec<u8> {
    encode(&StoredMessage::Inline {
        level: level as u8,
        sent_at_ms,
        text: text.to_owned(),
    })
}

/// The value of every recipient's record of a bulk send.
pub(crate) fn encode_shared() -> Vec<u8> {
    encode(&StoredMessage::Shared)
}

pub(crate) fn decode_record(bytes: &[u8]) -> Result<Record, String> {
    Ok(match decode::<StoredMessage>(bytes)? {
        StoredMessage::Inline {
            level: value,
            sent_at_ms,
            text,
        } => Record::Inline {
            level: level(value)?,
            sent_at_ms,
            text,
        },
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
    level: u8,
    sent_at_ms: u64,
    text: String,
    /// Sorted, without duplicates.
    strs: Vec<String>,
}

/// A decoded bulk record.
#[derive(Debug, PartialEq)]
pub(crate) struct BulkRecord {
    pub(crate) level: Level,
    pub(crate) sent_at_ms: u64,
    pub(crate) text: String,
    pub(crate) recipients: Recipients,
}

/// `FORMAT_VERSION ‖ bincode(level, sent_at_ms, text, string ids) ‖ roaring
/// treemap of the integer ids` (the roaring format is portable and specified).
pub(crate) fn encode_bulk(
    level: Level,
    sent_at_ms: u64,
    text: &str,
    recipients: &Recipients,
) -> Vec<u8> {
    let mut out = encode(&BulkHeader {
        level: level as u8,
        sent_at_ms,
        text: text.to_owned(),
        strs: recipients.strs.clone(),
    });
    out.reserve(recipients.ints.serialized_size());
    // Writing into a Vec cannot fail.
    let _ = recipients.ints.serialize_into(&mut out);
    out
}

pub(crate) fn decode_bulk(bytes: &[u8]) -> Result<BulkRecord, String> {
    let body = body(bytes)?;
    let (header, used) = bincode::serde::decode_from_slice::<BulkHeader, _>(body, config())
        .map_err(|e| format!("the bulk record does not decode: {e}"))?;
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
        level: level(header.level)?,
        sent_at_ms: header.sent_at_ms,
        text: header.text,
        recipients: Recipients {
            ints,
            strs: header.strs,
        },
    })
}

pub(crate) fn encode_text(level: Level, sent_at_ms: u64, text: &str) -> Vec<u8> {
    encode(&SharedText {
        level: level as u8,
        sent_at_ms,
        text: text.to_owned(),
    })
}

pub(crate) fn decode_text(bytes: &[u8]) -> Result<Text, String> {
    let body = decode::<SharedText>(bytes)?;
    Ok(Text {
        level: level(body.level)?,
        sent_at_ms: body.sent_at_ms,
        text: body.text,
    })
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

    #[test]
    fn records_round_trip() {
        let bytes = encode_inline(Level::Warning, 5, "hi");
        assert_eq!(
            decode_record(&bytes),
            Ok(Record::Inline {
                level: Level::Warning,
                sent_at_ms: 5,
                text: "hi".into()
            })
        );
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
        let bulk = decode_bulk(&encode_bulk(Level::Info, 7, "all", &recipients));
        assert_eq!(
            bulk,
            Ok(BulkRecord {
                level: Level::Info,
                sent_at_ms: 7,
                text: "all".into(),
                recipients
            })
        );
        let text = decode_text(&encode_text(Level::Error, 9, "boom"));
        assert_eq!(text.map(|t| t.text), Ok("boom".to_owned()));
    }

    #[test]
    fn bad_bytes_are_errors() {
        assert!(decode_record(&[]).is_err());
        assert!(decode_record(&[2, 1]).is_err());
        assert!(decode_record(&[1, 9]).is_err());
        let mut trailing = encode_shared();
        trailing.push(0);
        assert!(decode_record(&trailing).is_err());
        // A length prefix claiming a huge string must fail, not allocate.
        assert!(decode_record(&[1, 0, 20, 5, 252, 255, 255, 255, 255]).is_err());
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
