//! Senders and drainers at once on one user: every message is delivered
//! exactly once, each sender's messages in its send order, none lost.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use async_messages::{Level, Message, MessageStore, Result};
use common::TestDir;

const SENDERS: usize = 4;
const DRAINERS: usize = 3;
const PER_SENDER: usize = 400;

fn run(store: &MessageStore, bulk: bool) -> Result<()> {
    let done = AtomicBool::new(false);
    let delivered: Vec<Vec<Message>> = thread::scope(|scope| -> Result<Vec<Vec<Message>>> {
        let drainers: Vec<_> = (0..DRAINERS)
            .map(|_| {
                let done = &done;
                scope.spawn(move || -> Result<Vec<Message>> {
                    let mut got = Vec::new();
                    loop {
                        let finished = done.load(Ordering::Acquire);
                        got.extend(store.get_messages(7_u64)?);
                        if finished {
                            return Ok(got);
                        }
                    }
                })
            })
            .collect();
        let senders: Vec<_> = (0..SENDERS)
            .map(|s| {
                scope.spawn(move || -> Result<()> {
                    for i in 0..PER_SENDER {
                        let text = format!("{s}:{i}");
                        if bulk && i % 3 == 0 {
                            // Some sends reach this user through a bulk send.
                            store.message_users([7_u64, 8, 9], text, Level::Info)?;
                        } else {
                            store.message_user(7_u64, text, Level::Info)?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for sender in senders {
            sender.join().expect("sender panicked")?;
        }
        done.store(true, Ordering::Release);
        drainers
            .into_iter()
            .map(|d| d.join().expect("drainer panicked"))
            .collect()
    })?;

    let mut seen: HashMap<String, usize> = HashMap::new();
    // One drainer's drains happen one after another, so along its history
    // each sender's messages must appear in send order (within a drain and
    // across its drains).
    for history in &delivered {
        let mut last: HashMap<usize, usize> = HashMap::new();
        for message in history {
            *seen.entry(message.text().to_owned()).or_default() += 1;
            let (sender, index) = parse(message.text());
            if let Some(previous) = last.insert(sender, index) {
                assert!(
                    previous < index,
                    "sender {sender}: message {previous} delivered after {index}"
                );
            }
        }
    }
    assert_eq!(seen.len(), SENDERS * PER_SENDER, "every message delivered");
    assert!(seen.values().all(|n| *n == 1), "no message delivered twice");
    assert!(store.get_messages(7_u64)?.is_empty());
    Ok(())
}

#[test]
fn senders_and_drainers_on_one_user_deliver_each_message_exactly_once() -> Result<()> {
    let dir = TestDir::new();
    run(&dir.open_fast()?, false)
}

#[test]
fn exactly_once_holds_with_bulk_sends_and_durable_writes() -> Result<()> {
    let dir = TestDir::new();
    let store = dir.open()?;
    run(&store, true)?;
    // The other bulk recipients got every bulk message once.
    let eight = store.get_messages(8_u64)?;
    assert_eq!(eight.len(), SENDERS * PER_SENDER.div_ceil(3));
    Ok(())
}

fn parse(text: &str) -> (usize, usize) {
    let (sender, index) = text.split_once(':').expect("texts are sender:index");
    (
        sender.parse().expect("sender is a number"),
        index.parse().expect("index is a number"),
    )
}
