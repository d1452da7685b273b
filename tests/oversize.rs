//! Oversize and empty messages are refused with a typed error, and nothing
//! is stored — also by `message_users`, which checks before writing.

mod common;

use async_messages::{Error, Level, MessageStore, Result, UserId};
use common::engines::Engine;

fn a_64_mib_message_is_refused_and_nothing_is_stored(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    let huge = "x".repeat(64 << 20);
    let error = store
        .message_user(1_u64, huge.clone(), Level::Info)
        .unwrap_err();
    assert!(
        matches!(error, Error::MessageTooLarge { size, limit } if size == 64 << 20 && limit == MessageStore::DEFAULT_MAX_MESSAGE_BYTES)
    );
    assert!(error.to_string().contains("67108864 bytes"), "{error}");
    let error = store
        .message_users([1_u64, 2], huge, Level::Info)
        .unwrap_err();
    assert!(matches!(error, Error::MessageTooLarge { .. }));
    assert_eq!(store.count(1_u64)?, 0);
    assert_eq!(store.count(2_u64)?, 0);
    Ok(())
}

fn the_default_limit_is_64_kib_and_at_most_1_mib(engine: Engine) -> Result<()> {
    assert_eq!(MessageStore::DEFAULT_MAX_MESSAGE_BYTES, 64 * 1024);
    let store = engine.open()?;
    let limit = MessageStore::DEFAULT_MAX_MESSAGE_BYTES;
    store.info(1_u64, "y".repeat(limit))?;
    assert!(matches!(
        store.info(1_u64, "y".repeat(limit + 1)),
        Err(Error::MessageTooLarge { .. })
    ));
    assert_eq!(store.get_messages(1_u64)?[0].text().len(), limit);
    Ok(())
}

fn the_limit_is_configurable(engine: Engine) -> Result<()> {
    let store = engine.open_with(|builder| builder.max_message_bytes(10))?;
    store.info(1_u64, "0123456789")?;
    assert!(matches!(
        store.info(1_u64, "0123456789A"),
        Err(Error::MessageTooLarge {
            size: 11,
            limit: 10
        })
    ));
    Ok(())
}

fn an_empty_message_is_refused(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    assert!(matches!(store.info(1_u64, ""), Err(Error::EmptyMessage)));
    assert!(matches!(
        store.message_users([1_u64], "", Level::Info),
        Err(Error::EmptyMessage)
    ));
    assert_eq!(store.count(1_u64)?, 0);
    Ok(())
}

fn an_over_long_user_id_is_refused_and_rolls_back_a_bulk_send(engine: Engine) -> Result<()> {
    let mut store = engine.open()?;
    let long = UserId::Str("u".repeat(UserId::MAX_STR_BYTES + 1));
    assert!(matches!(
        store.info(long.clone(), "hi"),
        Err(Error::UserIdTooLong { .. })
    ));
    // The bad id comes after 20,000 good ones, so whole chunks were written.
    let users = (0..20_000_u64).map(UserId::from).chain([long]);
    assert!(matches!(
        store.message_users(users, "hi", Level::Info),
        Err(Error::UserIdTooLong { .. })
    ));
    for user in [0_u64, 8191, 8192, 19_999] {
        assert_eq!(store.count(user)?, 0, "user {user}");
        assert!(store.get_messages(user)?.is_empty(), "user {user}");
    }
    // And after a reopen (recovery rolls the orphans back for good).
    store.reopen()?;
    assert!(store.get_messages(0_u64)?.is_empty());
    assert!(store.get_messages(19_999_u64)?.is_empty());
    Ok(())
}

engine_tests! {
    a_64_mib_message_is_refused_and_nothing_is_stored,
    the_default_limit_is_64_kib_and_at_most_1_mib,
    the_limit_is_configurable,
    an_empty_message_is_refused,
    an_over_long_user_id_is_refused_and_rolls_back_a_bulk_send,
}
