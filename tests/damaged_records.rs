//! Damaged records (bytes that do not decode, an unknown format version)
//! give a typed error, never a panic, and other users keep working.

mod common;

use async_messages::{Error, Level, Result};
use common::{TestDir, raw_db, texts};

/// The key the store uses for integer user `user`, message `seq`.
fn int_key(user: u64, seq: u64) -> Vec<u8> {
    let mut key = vec![0x01];
    key.extend_from_slice(&user.to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn damage(dir: &TestDir, records: &[(Vec<u8>, Vec<u8>)]) {
    let db = raw_db(&dir.store_path());
    let messages = db.open_tree("messages").expect("messages tree");
    for (key, value) in records {
        messages.insert(key, value.as_slice()).expect("insert");
    }
    db.flush().expect("flush");
}

#[test]
fn undecodable_and_future_records_give_typed_errors_and_others_keep_working() -> Result<()> {
    let dir = TestDir::new();
    {
        let store = dir.open()?;
        store.info(1_u64, "one, first")?;
        store.info(1_u64, "one, second")?;
        store.info(3_u64, "three")?;
    }
    damage(
        &dir,
        &[
            // User 1: garbage between its two good messages.
            (int_key(1, u64::MAX / 2), vec![1, 0xff, 0xfe, 0x00]),
            // User 2: a record from a future format version.
            (int_key(2, 5), vec![9, 0, 20, 0, 1, b'x']),
            // User 4: an empty value, and a truncated one.
            (int_key(4, 1), vec![]),
            (int_key(4, 2), vec![1, 0]),
        ],
    );
    let store = dir.open()?;

    // Other users keep working.
    assert_eq!(texts(&store.get_messages(3_u64)?), ["three"]);

    for user in [1_u64, 2, 4] {
        let error = store.get_messages(user).unwrap_err();
        assert!(
            matches!(&error, Error::Corrupt { what, .. } if what.contains(&format!("user {user}"))),
            "{error:?}"
        );
    }
    let error = store.peek(4_u64).unwrap_err();
    assert!(matches!(error, Error::Corrupt { .. }));
    let future = store.quarantined()?;
    assert!(
        future
            .iter()
            .any(|q| q.reason().contains("format version 9")),
        "{future:?}"
    );

    // The damaged records were moved aside; the good ones are all still there.
    assert_eq!(
        texts(&store.get_messages(1_u64)?),
        ["one, first", "one, second"]
    );
    assert!(store.get_messages(2_u64)?.is_empty());
    assert!(store.get_messages(4_u64)?.is_empty());
    assert_eq!(store.quarantined()?.len(), 4);

    // And the store still takes new messages for those users.
    store.info(2_u64, "fresh")?;
    assert_eq!(texts(&store.get_messages(2_u64)?), ["fresh"]);
    Ok(())
}

#[test]
fn a_damaged_key_is_quarantined_at_open() -> Result<()> {
    let dir = TestDir::new();
    dir.open()?.info(1_u64, "kept")?;
    damage(&dir, &[(vec![0x7f, 1, 2], vec![1, 1])]);
    let store = dir.open()?;
    let quarantined = store.quarantined()?;
    assert_eq!(quarantined.len(), 1);
    assert_eq!(quarantined[0].key(), [0x7f, 1, 2]);
    assert_eq!(texts(&store.get_messages(1_u64)?), ["kept"]);
    Ok(())
}

#[test]
fn a_damaged_shared_text_is_reported_and_the_user_keeps_working() -> Result<()> {
    let dir = TestDir::new();
    let id = {
        let store = dir.open()?;
        let sent = store.message_users([1_u64, 2], "bulk", Level::Info)?;
        store.info(1_u64, "after")?;
        sent.id().expect("sent").get()
    };
    {
        let db = raw_db(&dir.store_path());
        db.open_tree("texts")
            .expect("texts tree")
            .insert(id.to_be_bytes(), &[1_u8, 0xff][..])
            .expect("insert");
        db.flush().expect("flush");
    }
    let store = dir.open()?;
    assert!(matches!(
        store.get_messages(1_u64),
        Err(Error::Corrupt { .. })
    ));
    assert_eq!(texts(&store.get_messages(1_u64)?), ["after"]);
    // The other recipient's copy cannot be shown; it is dropped, not an error loop.
    assert!(
        store
            .get_messages(2_u64)
            .map(|m| m.is_empty())
            .unwrap_or(true)
    );
    assert!(store.get_messages(2_u64)?.is_empty());
    Ok(())
}
