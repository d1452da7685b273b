//! Persistence: close and reopen; undelivered messages are still there,
//! delivered ones stay gone. Reopening right after the last handle is
//! dropped works every time.

mod common;

use async_messages::{Durability, Level, MessageStore, Result};
use common::{TestDir, texts};

#[test]
fn undelivered_messages_survive_a_reopen_and_delivered_ones_stay_gone() -> Result<()> {
    let dir = TestDir::new();
    {
        let store = dir.open()?;
        store.info(1_u64, "delivered")?;
        assert_eq!(texts(&store.get_messages(1_u64)?), ["delivered"]);
        store.info(1_u64, "kept")?;
        store.message_users([1_u64, 2, 3], "bulk", Level::Warning)?;
        assert_eq!(texts(&store.get_messages(3_u64)?), ["bulk"]);
    }
    let store = dir.open()?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["kept", "bulk"]);
    assert_eq!(texts(&store.get_messages(2_u64)?), ["bulk"]);
    assert!(store.get_messages(3_u64)?.is_empty());
    Ok(())
}

#[test]
fn ids_keep_growing_across_reopens() -> Result<()> {
    let dir = TestDir::new();
    let first = dir.open()?.info(1_u64, "a")?.expect("stored");
    let second = dir.open()?.info(1_u64, "b")?.expect("stored");
    assert!(second > first);
    assert_eq!(texts(&dir.open()?.get_messages(1_u64)?), ["a", "b"]);
    Ok(())
}

#[test]
fn periodic_durability_keeps_messages_after_a_clean_close() -> Result<()> {
    let dir = TestDir::new();
    let open = || {
        MessageStore::builder()
            .path(dir.store_path())
            .durability(Durability::Periodic(std::time::Duration::from_secs(60)))
            .open()
    };
    open()?.info("ann", "written on close")?;
    assert_eq!(texts(&open()?.get_messages("ann")?), ["written on close"]);
    Ok(())
}

#[test]
fn reopening_right_after_drop_works_every_time() -> Result<()> {
    let dir = TestDir::new();
    for round in 0..60_u64 {
        let store = dir.open()?;
        let clone = store.clone();
        store.info(round, format!("round {round}"))?;
        if round > 0 {
            assert_eq!(
                texts(&clone.get_messages(round - 1)?),
                [format!("round {}", round - 1)]
            );
        }
        drop(store);
        drop(clone);
    }
    Ok(())
}
