//! Concurrent senders never overwrite each other (the original lost 55–65 %
//! of messages in this test).

mod common;

use std::collections::HashSet;
use std::thread;

use async_messages::{Level, Result};
use common::TestDir;

const THREADS: usize = 8;
const PER_THREAD: usize = 250;

fn eight_threads_to_one_user(durable: bool) -> Result<()> {
    let dir = TestDir::new();
    let store = if durable {
        dir.open()?
    } else {
        dir.open_fast()?
    };
    thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = store.clone();
                scope.spawn(move || -> Result<()> {
                    for i in 0..PER_THREAD {
                        store.message_user("shared", format!("{t}:{i}"), Level::Info)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("sender thread panicked"))
    })?;
    let messages = store.get_messages("shared")?;
    assert_eq!(messages.len(), THREADS * PER_THREAD);
    let distinct: HashSet<&str> = messages.iter().map(|m| m.text()).collect();
    assert_eq!(distinct.len(), THREADS * PER_THREAD);
    Ok(())
}

#[test]
fn eight_threads_sending_to_one_user_lose_nothing() -> Result<()> {
    eight_threads_to_one_user(false)
}

#[test]
fn eight_threads_sending_durably_lose_nothing() -> Result<()> {
    eight_threads_to_one_user(true)
}
