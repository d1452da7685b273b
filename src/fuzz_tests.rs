//! Every decoder against arbitrary bytes: no panic, no huge allocation, and
//! what decodes re-encodes to the same bytes (so nothing is silently
//! reinterpreted).

use proptest::prelude::*;

use crate::engine::sled::{RecordCounts, clean_mark_text, parse_clean_mark};
use crate::key::{self, decode_user, split_key, split_text_key};
use crate::record::{self, Record, decode_format, decode_record, decode_text};
use crate::record::{decode_quarantined, encode_quarantined};

/// Damages valid bytes: `how` 0 leaves them, 1 overwrites the byte at
/// `index` (wrapped) with `byte` (flipped if equal), 2 cuts them there, 3
/// inserts `byte` there.
fn damage(mut bytes: Vec<u8>, index: usize, byte: u8, how: u8) -> Vec<u8> {
    if bytes.is_empty() {
        return bytes;
    }
    let i = index % bytes.len();
    match how {
        0 => {}
        1 if bytes[i] == byte => bytes[i] ^= 1,
        1 => bytes[i] = byte,
        2 => bytes.truncate(i),
        _ => bytes.insert(i, byte),
    }
    bytes
}

/// Bytes that look like records: a plausible version byte, then anything.
fn record_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        (0_u8..3, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(v, rest)| {
            let mut bytes = vec![v];
            bytes.extend(rest);
            bytes
        }),
        // A valid record with one byte changed, cut or extended.
        (
            any::<u8>(),
            "[a-z]{0,20}",
            any::<u64>(),
            any::<usize>(),
            any::<u8>(),
            0_u8..3
        )
            .prop_map(|(level, text, at, index, byte, how)| {
                let level = crate::Level::from_value(level).unwrap_or(crate::Level::Info);
                let message = crate::engine::Outgoing {
                    level,
                    sent_at_ms: at,
                    expires_at_ms: (at % 2 == 0).then_some(at / 2),
                    replace_key: (at % 3 == 0)
                        .then(|| text.clone())
                        .filter(|k| !k.is_empty()),
                    text,
                };
                damage(record::encode_inline(&message), index, byte, how + 1)
            }),
    ]
}

/// Bytes that look like keys: a tag, a length, then anything.
fn key_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..48),
        (
            0_u8..4,
            0_u32..40,
            proptest::collection::vec(any::<u8>(), 0..48)
        )
            .prop_map(|(tag, len, rest)| {
                let mut bytes = vec![tag];
                bytes.extend_from_slice(&len.to_be_bytes());
                bytes.extend(rest);
                bytes
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn record_decoders_never_panic(bytes in record_like()) {
        // Records of the current version re-encode to their bytes (older
        // ones are rewritten in the current version).
        let current = bytes.first() == Some(&record::FORMAT_VERSION);
        if let Ok(record) = decode_record(&bytes) {
            let again = match &record {
                Record::Inline(message) => record::encode_inline(message),
                Record::Shared => record::encode_shared(),
                Record::Taken { removed } => record::encode_taken(removed),
            };
            if current {
                prop_assert_eq!(again, bytes.clone(), "a decoded record re-encodes to its bytes");
            } else {
                prop_assert_eq!(decode_record(&again), Ok(record));
            }
        }
        if let Ok(text) = decode_text(&bytes) {
            let again = record::encode_text(&text);
            if current {
                prop_assert_eq!(again, bytes.clone());
            } else {
                prop_assert_eq!(decode_text(&again), Ok(text));
            }
        }
        if let Some(version) = decode_format(&bytes) {
            prop_assert_eq!(vec![version], bytes);
        }
    }

    #[test]
    fn key_decoders_never_panic(bytes in key_like()) {
        if let Some((prefix, seq)) = split_key(&bytes) {
            let user = decode_user(prefix);
            prop_assert!(user.is_some());
            let user = user.unwrap_or(crate::UserId::Int(0));
            let prefix_again = key::user_prefix(&user);
            prop_assert!(prefix_again.is_ok());
            let prefix_again = prefix_again.unwrap_or_default();
            prop_assert_eq!(key::message_key(&prefix_again, seq), bytes.clone());
        }
        if let Some(user) = decode_user(&bytes) {
            prop_assert_eq!(key::user_prefix(&user).ok(), Some(bytes.clone()));
        }
        if let Some(id) = split_text_key(&bytes) {
            prop_assert_eq!(key::text_key(id).to_vec(), bytes);
        }
    }
}

/// Valid bulk records, then damaged: bits flipped, cut short or extended.
fn bulk_like() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec(any::<u64>(), 0..64),
        proptest::collection::vec(0_u64..70_000, 0..64),
        proptest::collection::vec("[a-c\\x00é]{0,4}", 0..8),
        any::<u16>(),
        any::<u8>(),
        0_u8..4,
    )
        .prop_map(|(sparse, dense, strs, at, bits, how)| {
            let mut recipients = crate::recipients::Recipients::default();
            for id in sparse.into_iter().chain(dense) {
                recipients.push(crate::UserId::Int(id));
            }
            for name in strs {
                recipients.push(crate::UserId::Str(name));
            }
            recipients.seal();
            let message = crate::engine::Outgoing {
                level: crate::Level::Info,
                sent_at_ms: 1,
                expires_at_ms: Some(5),
                replace_key: Some("k".into()),
                text: "hello".into(),
            };
            let bytes = record::encode_bulk(&message, at % 2 == 0, &recipients);
            damage(bytes, usize::from(at), bits, how)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// A bulk record, damaged or not, decodes to an error or to a record
    /// that encodes back to one decoding to the same thing.
    #[test]
    fn bulk_decoder_never_panics(bytes in prop_oneof![bulk_like(), record_like()]) {
        if let Ok(bulk) = record::decode_bulk(&bytes) {
            let again = record::encode_bulk(&bulk.message, bulk.everyone, &bulk.recipients);
            prop_assert_eq!(record::decode_bulk(&again), Ok(bulk));
        }
    }
}

/// Bytes that look like quarantine entries: a valid entry (built from its
/// fields, in declaration order, as serde lays them out) as is, or with a
/// byte changed, cut or added; or anything.
fn quarantine_like() -> impl Strategy<Value = Vec<u8>> {
    let entry = (
        "[a-z]{0,8}",
        proptest::collection::vec(any::<u8>(), 0..24),
        proptest::collection::vec(any::<u8>(), 0..40),
        "[a-z é]{0,16}",
        any::<u64>(),
    );
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..96),
        (entry, any::<usize>(), any::<u8>(), 0_u8..4).prop_map(|(fields, index, byte, how)| {
            let mut bytes = vec![crate::record::FORMAT_VERSION];
            bytes.extend(
                bincode::serde::encode_to_vec(&fields, bincode::config::standard())
                    .unwrap_or_default(),
            );
            damage(bytes, index, byte, how)
        }),
    ]
}

/// Text that looks like a clean-close mark, then damaged; or anything.
fn clean_mark_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..96),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<usize>(),
            any::<u8>(),
            0_u8..4
        )
            .prop_map(|(messages, texts, bulk, index, byte, how)| {
                let counts = RecordCounts {
                    messages,
                    texts,
                    bulk,
                };
                damage(clean_mark_text(counts).into_bytes(), index, byte, how)
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// A quarantine entry decodes to nothing or to a record that encodes
    /// back to exactly its bytes.
    #[test]
    fn quarantine_decoder_never_panics(bytes in quarantine_like()) {
        if let Some(record) = decode_quarantined(&bytes) {
            prop_assert_eq!(encode_quarantined(&record), bytes);
        }
    }

    /// What the store writes, it reads back, field for field.
    #[test]
    fn quarantine_entries_round_trip(
        tree in "[a-z]{0,8}",
        key in proptest::collection::vec(any::<u8>(), 0..24),
        value in proptest::collection::vec(any::<u8>(), 0..40),
        reason in "[a-z é]{0,16}",
        at_ms in any::<u64>(),
    ) {
        let mut bytes = vec![crate::record::FORMAT_VERSION];
        bytes.extend(
            bincode::serde::encode_to_vec(
                (&tree, &key, &value, &reason, at_ms),
                bincode::config::standard(),
            )
            .unwrap_or_default(),
        );
        let record = decode_quarantined(&bytes)
            .ok_or_else(|| TestCaseError::fail("a written entry does not decode"))?;
        prop_assert_eq!(
            (record.tree(), record.key(), record.value(), record.reason(), record.quarantined_at_ms()),
            (tree.as_str(), key.as_slice(), value.as_slice(), reason.as_str(), at_ms)
        );
        prop_assert_eq!(encode_quarantined(&record), bytes);
    }

    /// A clean-close mark parses to nothing or to counts whose mark parses
    /// to the same counts; a mark the store wrote parses to its counts.
    #[test]
    fn clean_mark_parser_never_panics(bytes in clean_mark_like(), counts in any::<(u64, u64, u64)>()) {
        if let Some(parsed) = parse_clean_mark(&bytes) {
            prop_assert_eq!(parse_clean_mark(clean_mark_text(parsed).as_bytes()), Some(parsed));
        }
        let counts = RecordCounts { messages: counts.0, texts: counts.1, bulk: counts.2 };
        prop_assert_eq!(parse_clean_mark(clean_mark_text(counts).as_bytes()), Some(counts));
    }
}

#[test]
fn a_clean_mark_without_a_count_or_in_bad_utf8_is_not_a_mark() {
    assert_eq!(parse_clean_mark(b"messages=3"), None);
    assert_eq!(parse_clean_mark(b"texts=3 bulk=1"), None);
    assert_eq!(parse_clean_mark(b"messages=3 texts=x"), None);
    assert_eq!(parse_clean_mark(b"messages=3 texts=4 \xff"), None);
    // Written before bulk records existed: no bulk count means none.
    assert_eq!(
        parse_clean_mark(b"async-messages clean close v1 messages=3 texts=4\n"),
        Some(RecordCounts {
            messages: 3,
            texts: 4,
            bulk: 0
        })
    );
}

#[test]
fn a_huge_length_prefix_does_not_allocate() {
    // Version 1, Inline, level 20, time 0, then a string length of u64::MAX.
    let mut bytes = vec![1, 0, 20, 0, 253];
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(decode_record(&bytes).is_err());
    assert!(decode_text(&bytes[1..]).is_err());
    let mut key = vec![2];
    key.extend_from_slice(&u32::MAX.to_be_bytes());
    key.extend_from_slice(&[0; 8]);
    assert!(split_key(&key).is_none());
}
