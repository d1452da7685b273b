//! Users are isolated: integer and string ids never collide or see each
//! other's messages.

mod common;

use std::collections::BTreeMap;

use async_messages::{Level, Result, UserId};
use common::engines::Engine;
use common::texts;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn tricky_users() -> Vec<UserId> {
    vec![
        UserId::from(0_u64),
        UserId::from(1_u64),
        UserId::from(u64::MAX),
        UserId::from(""),
        UserId::from("0"),
        UserId::from("a"),
        UserId::from("ab"),
        UserId::from("a\0"),
        UserId::from("a\0b"),
        UserId::from("\0"),
        UserId::from("émilie"),
        UserId::from("名前"),
        UserId::from("\u{1F600}"),
        UserId::Str("x".repeat(UserId::MAX_STR_BYTES)),
    ]
}

fn tricky_ids_each_get_only_their_own_messages(engine: Engine) -> Result<()> {
    let store = engine.open_fast()?;
    let users = tricky_users();
    for (i, user) in users.iter().enumerate() {
        store.message_user(user, format!("for {i}"), Level::Info)?;
    }
    store.message_users(users.iter(), "for everyone", Level::Info)?;
    for (i, user) in users.iter().enumerate() {
        assert_eq!(store.count(user)?, 2, "user {user}");
        assert_eq!(
            texts(&store.get_messages(user)?),
            [format!("for {i}"), "for everyone".into()]
        );
    }
    Ok(())
}

fn integer_and_string_ids_are_different_users(engine: Engine) -> Result<()> {
    let store = engine.open_fast()?;
    store.info(7_u64, "int")?;
    store.info("7", "string")?;
    assert_eq!(texts(&store.get_messages("7")?), ["string"]);
    assert_eq!(texts(&store.get_messages(7_u64)?), ["int"]);
    Ok(())
}

fn any_user() -> impl Strategy<Value = UserId> {
    prop_oneof![
        any::<u64>().prop_map(UserId::Int),
        prop_oneof![Just(0_u64), Just(u64::MAX), 0_u64..4].prop_map(UserId::Int),
        "[a\\x00é]{0,4}".prop_map(UserId::Str),
        any::<String>().prop_map(UserId::Str),
    ]
}

/// Whatever the ids, each user receives exactly the messages sent to it.
fn any_ids_are_isolated(engine: Engine) {
    let stores = engine.stores();
    let config = Config {
        cases: 48,
        // As `proptest!` does: a failing case is saved next to this file.
        source_file: Some(file!()),
        ..Config::default()
    };
    let sends = proptest::collection::vec((any_user(), 0_u8..3), 1..24);
    let result = TestRunner::new(config).run(&sends, |sends| {
        let store = stores.open_fast().expect("open");
        let mut expected: BTreeMap<UserId, Vec<String>> = BTreeMap::new();
        for (n, (user, kind)) in sends.iter().enumerate() {
            let text = format!("message {n}");
            if *kind == 0 {
                store
                    .message_users([user.clone(), UserId::Int(424_242)], &text, Level::Info)
                    .expect("bulk");
                if *user != UserId::Int(424_242) {
                    // A user listed twice gets the message once.
                    expected
                        .entry(UserId::Int(424_242))
                        .or_default()
                        .push(text.clone());
                }
            } else {
                store.message_user(user, &text, Level::Info).expect("send");
            }
            expected.entry(user.clone()).or_default().push(text);
        }
        for (user, want) in &expected {
            prop_assert_eq!(&texts(&store.get_messages(user).expect("drain")), want);
        }
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

engine_tests! {
    tricky_ids_each_get_only_their_own_messages,
    integer_and_string_ids_are_different_users,
    any_ids_are_isolated,
}
