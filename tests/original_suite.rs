//! django-async-messages' own test suite, restated, on every engine.

mod common;

use async_messages::{Level, MessageStore, Result};
use common::engines::Engine;
use common::texts;

fn a_message_appears_for_its_user_once(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    store.message_user(1_u64, "Barry, your report is ready", Level::Info)?;
    assert_eq!(
        texts(&store.get_messages(1_u64)?),
        ["Barry, your report is ready"]
    );
    assert!(store.get_messages(1_u64)?.is_empty());
    Ok(())
}

fn message_users_reaches_every_user(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    let sent = store.message_users(["ann", "bob", "cy"], "Boom!", Level::Warning)?;
    assert_eq!(sent.recipients(), 3);
    for user in ["ann", "bob", "cy"] {
        let messages = store.get_messages(user)?;
        assert_eq!(texts(&messages), ["Boom!"]);
        assert_eq!(messages[0].level(), Level::Warning);
        assert_eq!(Some(messages[0].id()), sent.id());
    }
    Ok(())
}

fn queued_messages_keep_their_order(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    store.info(5_u64, "first")?;
    store.message_users([5_u64, 6], "second", Level::Info)?;
    store.info(5_u64, "third")?;
    assert_eq!(
        texts(&store.get_messages(5_u64)?),
        ["first", "second", "third"]
    );
    Ok(())
}

fn a_user_never_messaged_gets_nothing(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    store.info(1_u64, "for someone else")?;
    assert!(store.get_messages(2_u64)?.is_empty());
    assert!(store.get_messages("anonymous")?.is_empty());
    assert_eq!(store.count(1_u64)?, 1);
    Ok(())
}

fn each_shortcut_delivers_its_level(engine: Engine) -> Result<()> {
    let store = engine.open_with(|builder| builder.min_level(Level::Debug))?;
    store.debug(1_u64, "debug")?;
    store.info(1_u64, "info")?;
    store.success(1_u64, "success")?;
    store.warning(1_u64, "warning")?;
    store.error(1_u64, "error")?;
    let messages = store.get_messages(1_u64)?;
    let got: Vec<(Level, &str)> = messages.iter().map(|m| (m.level(), m.text())).collect();
    assert_eq!(
        got,
        [
            (Level::Debug, "debug"),
            (Level::Info, "info"),
            (Level::Success, "success"),
            (Level::Warning, "warning"),
            (Level::Error, "error"),
        ]
    );
    Ok(())
}

fn debug_is_hidden_by_default(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    assert_eq!(store.debug(1_u64, "noise")?, None);
    let bulk = store.message_users([1_u64, 2], "noise", Level::Debug)?;
    assert_eq!(bulk.recipients(), 0);
    store.info(1_u64, "signal")?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["signal"]);
    assert!(store.get_messages(2_u64)?.is_empty());
    Ok(())
}

fn peek_and_count_do_not_drain(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    store.info("ann", "one")?;
    store.info("ann", "two")?;
    assert_eq!(texts(&store.peek("ann")?), ["one", "two"]);
    assert_eq!(store.count("ann")?, 2);
    assert_eq!(texts(&store.get_messages("ann")?), ["one", "two"]);
    assert_eq!(store.count("ann")?, 0);
    Ok(())
}

fn messages_carry_when_they_were_sent(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    let before = std::time::SystemTime::now() - std::time::Duration::from_secs(1);
    store.info(1_u64, "now")?;
    let message = &store.get_messages(1_u64)?[0];
    assert!(message.sent_at() >= before);
    assert!(message.sent_at() <= std::time::SystemTime::now() + std::time::Duration::from_secs(1));
    Ok(())
}
engine_tests! {
    a_message_appears_for_its_user_once,
    message_users_reaches_every_user,
    queued_messages_keep_their_order,
    a_user_never_messaged_gets_nothing,
    each_shortcut_delivers_its_level,
    debug_is_hidden_by_default,
    peek_and_count_do_not_drain,
    messages_carry_when_they_were_sent,
}

#[test]
fn levels_have_djangos_values_order_and_names() {
    let values: Vec<u8> = Level::ALL.iter().map(|l| *l as u8).collect();
    assert_eq!(values, [10, 20, 25, 30, 40]);
    assert!(Level::ALL.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(Level::Success.to_string(), "success");
    assert_eq!("WARNING".parse::<Level>().ok(), Some(Level::Warning));
    assert_eq!("40".parse::<Level>().ok(), Some(Level::Error));
    assert!("loud".parse::<Level>().is_err());
}

#[test]
fn store_handle_is_send_sync_and_clone() {
    fn assert_traits<T: Send + Sync + Clone + 'static>() {}
    assert_traits::<MessageStore>();
    fn assert_error<T: std::error::Error + Send + Sync + 'static>() {}
    assert_error::<async_messages::Error>();
}
