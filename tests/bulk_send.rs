//! `message_users` to 100,000 users succeeds and is all or nothing.

mod common;

use async_messages::{Error, Level, Progress, Result, UserId};
use common::{TestDir, texts};

const USERS: u64 = 100_000;

#[test]
fn message_users_reaches_100_000_users() -> Result<()> {
    let dir = TestDir::new();
    let store = dir.open()?;
    let mut reports: Vec<Progress> = Vec::new();
    let sent = store.message_users_with_progress(
        0..USERS,
        "All budgets must be spent by Friday",
        Level::Warning,
        |progress| reports.push(progress),
    )?;
    assert_eq!(sent.recipients(), USERS);
    assert!(reports.len() >= 2);
    assert!(reports.windows(2).all(|w| w[0].written <= w[1].written));
    let last = reports.last().expect("a final report");
    assert!(last.committed && last.written == USERS);
    assert!(reports[..reports.len() - 1].iter().all(|p| !p.committed));

    // Every user has it, once; spot-check many, drain all after a reopen.
    for user in (0..USERS).step_by(997) {
        assert_eq!(store.count(user)?, 1, "user {user}");
    }
    drop(store);
    // Draining 100,000 users one by one is not the point here: skip the
    // per-drain fsync.
    let store = dir.open_fast()?;
    for user in 0..USERS {
        let messages = store.get_messages(user)?;
        assert_eq!(messages.len(), 1, "user {user}");
        assert_eq!(messages[0].level(), Level::Warning);
    }
    assert!(store.get_messages(0_u64)?.is_empty());
    Ok(())
}

#[test]
fn a_bulk_send_that_fails_half_way_reaches_nobody() -> Result<()> {
    let dir = TestDir::new();
    let store = dir.open()?;
    store.info(50_000_u64, "before")?;
    let bad = UserId::Str("z".repeat(UserId::MAX_STR_BYTES + 1));
    let users = (0..USERS / 2)
        .map(UserId::from)
        .chain([bad])
        .chain((USERS / 2..USERS).map(UserId::from));
    let error = store
        .message_users(users, "never", Level::Info)
        .unwrap_err();
    assert!(matches!(error, Error::UserIdTooLong { .. }), "{error:?}");
    for user in (0..USERS).step_by(499) {
        assert!(
            !texts(&store.peek(user)?).contains(&"never".to_owned()),
            "user {user}"
        );
    }
    assert_eq!(texts(&store.get_messages(50_000_u64)?), ["before"]);
    drop(store);
    let store = dir.open()?;
    for user in (0..USERS).step_by(499) {
        assert!(store.get_messages(user)?.is_empty(), "user {user}");
    }
    Ok(())
}

#[test]
fn a_user_listed_twice_gets_the_message_once() -> Result<()> {
    let dir = TestDir::new();
    let store = dir.open()?;
    store.message_users([1_u64, 2, 1], "once", Level::Info)?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["once"]);
    assert_eq!(texts(&store.get_messages(2_u64)?), ["once"]);
    Ok(())
}

#[test]
fn an_empty_user_list_queues_nothing() -> Result<()> {
    let dir = TestDir::new();
    let store = dir.open()?;
    let sent = store.message_users(Vec::<u64>::new(), "nobody", Level::Info)?;
    assert_eq!((sent.id(), sent.recipients()), (None, 0));
    Ok(())
}
