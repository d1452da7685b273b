//! Every decoder against arbitrary bytes: no panic, no huge allocation, and
//! what decodes re-encodes to the same bytes (so nothing is silently
//! reinterpreted).

use proptest::prelude::*;

use crate::key::{self, decode_user, split_key, split_text_key};
use crate::record::{self, Record, decode_format, decode_record, decode_text};

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
                let mut bytes = record::encode_inline(level, at, &text);
                let i = index % bytes.len();
                match how {
                    0 => bytes[i] = byte,
                    1 => bytes.truncate(i),
                    _ => bytes.push(byte),
                }
                bytes
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
        if let Ok(record) = decode_record(&bytes) {
            let again = match &record {
                Record::Inline { level, sent_at_ms, text } => record::encode_inline(*level, *sent_at_ms, text),
                Record::Shared => record::encode_shared(),
                Record::Taken => record::encode_taken(),
            };
            prop_assert_eq!(again, bytes.clone(), "a decoded record re-encodes to its bytes");
        }
        if let Ok(text) = decode_text(&bytes) {
            prop_assert_eq!(record::encode_text(text.level, text.sent_at_ms, &text.text), bytes.clone());
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
            let mut recipients = crate::bulk::Recipients::default();
            for id in sparse.into_iter().chain(dense) {
                recipients.push(crate::UserId::Int(id));
            }
            for name in strs {
                recipients.push(crate::UserId::Str(name));
            }
            recipients.seal();
            let mut bytes = record::encode_bulk(crate::Level::Info, 1, "hello", &recipients);
            let at = usize::from(at) % bytes.len();
            match how {
                0 => {}
                1 => bytes[at] ^= bits | 1,
                2 => bytes.truncate(at),
                _ => bytes.insert(at, bits),
            }
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// A bulk record, damaged or not, decodes to an error or to a record
    /// that encodes back to one decoding to the same thing.
    #[test]
    fn bulk_decoder_never_panics(bytes in prop_oneof![bulk_like(), record_like()]) {
        if let Ok(bulk) = record::decode_bulk(&bytes) {
            let again = record::encode_bulk(bulk.level, bulk.sent_at_ms, &bulk.text, &bulk.recipients);
            prop_assert_eq!(record::decode_bulk(&again), Ok(bulk));
        }
    }
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
