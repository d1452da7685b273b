//! The key codec: `user prefix ‖ sequence number`.
//!
//! ```text
//! integer user:  0x01 ‖ id: u64 BE                    ‖ seq: u64 BE
//! string user:   0x02 ‖ len: u32 BE ‖ UTF-8 bytes     ‖ seq: u64 BE
//! ```
//!
//! Invariants (checked by the `key_codec` property tests):
//! - injective: two different users never share a prefix;
//! - prefix-free: no user's prefix is a prefix of another user's key, so a
//!   prefix scan returns exactly that user's records;
//! - big-endian: byte order of keys is (user, send order).

use crate::{Error, Result, UserId};

const TAG_INT: u8 = 0x01;
const TAG_STR: u8 = 0x02;
/// Bytes of the sequence number at the end of every key.
pub(crate) const SEQ_LEN: usize = 8;

/// The encoded user: the first part of each of that user's keys.
pub(crate) fn user_prefix(user: &UserId) -> Result<Vec<u8>> {
    match user {
        UserId::Int(id) => {
            let mut out = Vec::with_capacity(1 + 8 + SEQ_LEN);
            out.push(TAG_INT);
            out.extend_from_slice(&id.to_be_bytes());
            Ok(out)
        }
        UserId::Str(name) => {
            let bytes = name.as_bytes();
            let len = str_id_len(name)?;
            let mut out = Vec::with_capacity(1 + 4 + bytes.len() + SEQ_LEN);
            out.push(TAG_STR);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(bytes);
            Ok(out)
        }
    }
}

/// Checks a user id against the rules every store shares: a string id is
/// at most [`UserId::MAX_STR_BYTES`] long ([`Error::UserIdTooLong`]).
pub(crate) fn check_user(user: &UserId) -> Result<()> {
    match user {
        UserId::Int(_) => Ok(()),
        UserId::Str(name) => str_id_len(name).map(drop),
    }
}

/// Checks a replace key: not empty, at most
/// [`MessageStore::MAX_REPLACE_KEY_BYTES`](crate::MessageStore::MAX_REPLACE_KEY_BYTES).
pub(crate) fn check_replace_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::EmptyReplaceKey);
    }
    let limit = crate::MessageStore::MAX_REPLACE_KEY_BYTES;
    if key.len() > limit {
        return Err(Error::ReplaceKeyTooLong {
            len: key.len(),
            limit,
        });
    }
    Ok(())
}

/// Checks an expiry duration: at least 1 ms, at most
/// [`MessageStore::MAX_EXPIRY`](crate::MessageStore::MAX_EXPIRY).
pub(crate) fn check_expiry(duration: std::time::Duration) -> Result<()> {
    let limit = crate::MessageStore::MAX_EXPIRY;
    let reason = if duration.is_zero() {
        "a message that expires at once would never be shown"
    } else if duration < std::time::Duration::from_millis(1) {
        "expiry is kept to the millisecond"
    } else if duration > limit {
        "that is longer than any message should wait"
    } else {
        return Ok(());
    };
    Err(Error::InvalidExpiry {
        duration,
        reason,
        limit,
    })
}

/// The length of a string user id as stored, or
/// [`Error::UserIdTooLong`] above [`UserId::MAX_STR_BYTES`].
pub(crate) fn str_id_len(name: &str) -> Result<u32> {
    u32::try_from(name.len())
        .ok()
        .filter(|len| *len as usize <= UserId::MAX_STR_BYTES)
        .ok_or(Error::UserIdTooLong {
            len: name.len(),
            limit: UserId::MAX_STR_BYTES,
        })
}

/// Writes the prefix of integer user `id` into `out`, without allocating.
pub(crate) fn write_int_prefix(out: &mut [u8; 9], id: u64) {
    out[0] = TAG_INT;
    out[1..].copy_from_slice(&id.to_be_bytes());
}

/// Writes the key of `user`'s message `seq` into `out` (cleared first),
/// reusing its allocation.
pub(crate) fn write_message_key(out: &mut Vec<u8>, user: &UserId, seq: u64) -> Result<()> {
    out.clear();
    match user {
        UserId::Int(id) => {
            out.push(TAG_INT);
            out.extend_from_slice(&id.to_be_bytes());
        }
        UserId::Str(_) => out.extend_from_slice(&user_prefix(user)?),
    }
    out.extend_from_slice(&seq.to_be_bytes());
    Ok(())
}

/// The key of one message: `prefix ‖ seq`.
pub(crate) fn message_key(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + SEQ_LEN);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Splits a stored key into its user prefix and sequence number, checking
/// that the prefix is well formed. `None` for a damaged key.
pub(crate) fn split_key(key: &[u8]) -> Option<(&[u8], u64)> {
    let split = key.len().checked_sub(SEQ_LEN)?;
    let (prefix, seq) = key.split_at(split);
    decode_user(prefix)?;
    let seq = u64::from_be_bytes(seq.try_into().ok()?);
    Some((prefix, seq))
}

/// Decodes a user prefix. `None` unless `prefix` is exactly one encoded user.
pub(crate) fn decode_user(prefix: &[u8]) -> Option<UserId> {
    let (&tag, rest) = prefix.split_first()?;
    match tag {
        TAG_INT => Some(UserId::Int(u64::from_be_bytes(rest.try_into().ok()?))),
        TAG_STR => {
            let (len, bytes) = rest.split_at_checked(4)?;
            let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
            if len != bytes.len() || len > UserId::MAX_STR_BYTES {
                return None;
            }
            Some(UserId::Str(String::from_utf8(bytes.to_vec()).ok()?))
        }
        _ => None,
    }
}

/// A text id (the sequence number of a bulk send) as a key of the texts tree.
pub(crate) fn text_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// The inverse of [`text_key`]; `None` for a damaged key.
pub(crate) fn split_text_key(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// A fast hash of a user prefix (FNV-1a, 64 bit), for the in-memory index.
/// Not used on disk; collisions cost speed, never correctness.
pub(crate) fn prefix_hash(prefix: &[u8]) -> u64 {
    prefix.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() -> Result<()> {
        for user in [
            UserId::Int(0),
            UserId::Int(u64::MAX),
            UserId::from(""),
            UserId::from("a\0b"),
            UserId::from("émilie"),
        ] {
            let prefix = user_prefix(&user)?;
            assert_eq!(decode_user(&prefix), Some(user.clone()));
            let key = message_key(&prefix, 7);
            assert_eq!(split_key(&key), Some((prefix.as_slice(), 7)));
        }
        assert_eq!(split_key(b"short"), None);
        assert_eq!(split_key(&[9; 17]), None);
        assert_eq!(decode_user(&[TAG_STR, 0, 0, 0, 5, b'a']), None);
        Ok(())
    }

    fn any_user() -> impl proptest::strategy::Strategy<Value = UserId> {
        use proptest::prelude::*;
        prop_oneof![
            any::<u64>().prop_map(UserId::Int),
            (0_u64..3).prop_map(UserId::Int),
            "[ab\\x00\\x01é]{0,5}".prop_map(UserId::Str),
            any::<String>().prop_map(UserId::Str),
        ]
    }

    proptest::proptest! {
        /// Injective and prefix-free: different users never share a prefix,
        /// and no user's prefix starts another user's key.
        #[test]
        fn codec_is_injective_and_prefix_free(a in any_user(), b in any_user(), seq in proptest::prelude::any::<u64>()) {
            let pa = user_prefix(&a).expect("short ids encode");
            let pb = user_prefix(&b).expect("short ids encode");
            proptest::prop_assert_eq!(a == b, pa == pb);
            let key_b = message_key(&pb, seq);
            proptest::prop_assert_eq!(key_b.starts_with(&pa), a == b);
            proptest::prop_assert_eq!(split_key(&key_b), Some((pb.as_slice(), seq)));
            proptest::prop_assert_eq!(decode_user(&pa), Some(a));
        }

        /// Key order is (user, sequence): for one user, byte order is send order.
        #[test]
        fn one_users_keys_sort_by_sequence(user in any_user(), s1 in proptest::prelude::any::<u64>(), s2 in proptest::prelude::any::<u64>()) {
            let prefix = user_prefix(&user).expect("short ids encode");
            proptest::prop_assert_eq!(message_key(&prefix, s1).cmp(&message_key(&prefix, s2)), s1.cmp(&s2));
        }
    }

    #[test]
    fn over_long_string_ids_are_refused() {
        let long = UserId::Str("x".repeat(UserId::MAX_STR_BYTES + 1));
        assert!(matches!(
            user_prefix(&long),
            Err(Error::UserIdTooLong {
                len: 1025,
                limit: 1024
            })
        ));
    }
}
