//! Senders and drainers at once on one user: every message is delivered
//! exactly once, none lost, and in each sender's order, within a drain and
//! across drains, whichever drainer ran them.
//!
//! Each drain is stamped with a global clock before it is called and after
//! it returns. A drain that returned before another was called came first,
//! so it must hold only earlier messages of each sender. Two drains that
//! overlapped in time still happened one after the other (a drain is
//! atomic), so for every sender one holds only earlier messages than the
//! other, and it is the same one for all senders.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

use async_messages::{Level, MessageStore, Result};
use common::engines::Engine;

const SENDERS: usize = 4;
const DRAINERS: usize = 3;
const PER_SENDER: usize = 400;

/// One non-empty drain: its clock stamps and what it returned, as
/// (sender, index) pairs in the order returned.
#[derive(Debug, Clone)]
struct Drain {
    called: u64,
    returned: u64,
    messages: Vec<(usize, usize)>,
}

impl Drain {
    /// Each sender's smallest and largest index in this drain.
    fn ranges(&self) -> BTreeMap<usize, (usize, usize)> {
        let mut ranges: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        for &(sender, index) in &self.messages {
            let range = ranges.entry(sender).or_insert((index, index));
            range.0 = range.0.min(index);
            range.1 = range.1.max(index);
        }
        ranges
    }
}

/// Which of two drains holds the earlier messages: `Some(true)` if `a`,
/// `Some(false)` if `b`, `None` if they share no sender; `Err` if the
/// senders disagree or a sender's messages interleave.
fn earlier(
    a: &BTreeMap<usize, (usize, usize)>,
    b: &BTreeMap<usize, (usize, usize)>,
) -> std::result::Result<Option<bool>, String> {
    let mut verdict: Option<(usize, bool)> = None;
    for (sender, (a_min, a_max)) in a {
        let Some((b_min, b_max)) = b.get(sender) else {
            continue;
        };
        let a_first = if a_max < b_min {
            true
        } else if b_max < a_min {
            false
        } else {
            return Err(format!(
                "sender {sender}: messages {a_min}..={a_max} and {b_min}..={b_max} interleave"
            ));
        };
        match verdict {
            Some((other, first)) if first != a_first => {
                return Err(format!(
                    "sender {other} says one drain came first, sender {sender} says the other"
                ));
            }
            _ => verdict = Some((*sender, a_first)),
        }
    }
    Ok(verdict.map(|(_, first)| first))
}

/// The order check over all drains; `Err` names the first violation.
fn check_order(drains: &[Drain]) -> std::result::Result<(), String> {
    let ranges: Vec<_> = drains.iter().map(Drain::ranges).collect();
    for (i, drain) in drains.iter().enumerate() {
        // Within a drain: each sender's messages in send order.
        let mut last: HashMap<usize, usize> = HashMap::new();
        for &(sender, index) in &drain.messages {
            if let Some(previous) = last.insert(sender, index)
                && previous >= index
            {
                return Err(format!(
                    "drain {i}: sender {sender}'s message {index} after {previous}"
                ));
            }
        }
        // Across drains.
        for (j, other) in drains.iter().enumerate().skip(i + 1) {
            let first = earlier(&ranges[i], &ranges[j])
                .map_err(|problem| format!("drains {i} and {j}: {problem}"))?;
            let (first_drain, second_drain) = match first {
                None => continue,
                Some(true) => (drain, other),
                Some(false) => (other, drain),
            };
            // The drain with the later messages must not have returned
            // before the one with the earlier messages was called.
            if second_drain.returned < first_drain.called {
                return Err(format!(
                    "a later drain delivered earlier messages: {first_drain:?} was called after {second_drain:?} returned"
                ));
            }
        }
    }
    Ok(())
}

fn run(store: &MessageStore, bulk: bool) -> Result<()> {
    let done = AtomicBool::new(false);
    let clock = AtomicU64::new(0);
    // Everyone starts together, so that drains run while senders send.
    let start = Barrier::new(SENDERS + DRAINERS);
    let drains: Vec<Vec<Drain>> = thread::scope(|scope| -> Result<Vec<Vec<Drain>>> {
        let drainers: Vec<_> = (0..DRAINERS)
            .map(|_| {
                let (done, clock, start) = (&done, &clock, &start);
                scope.spawn(move || -> Result<Vec<Drain>> {
                    let mut drains = Vec::new();
                    start.wait();
                    loop {
                        let finished = done.load(Ordering::Acquire);
                        let called = clock.fetch_add(1, Ordering::SeqCst);
                        let got = store.get_messages(7_u64)?;
                        let returned = clock.fetch_add(1, Ordering::SeqCst);
                        if got.is_empty() {
                            // Once the senders are done, an empty drain
                            // means everything has been taken.
                            if finished {
                                return Ok(drains);
                            }
                            continue;
                        }
                        drains.push(Drain {
                            called,
                            returned,
                            messages: got.iter().map(|m| parse(m.text())).collect(),
                        });
                    }
                })
            })
            .collect();
        let senders: Vec<_> = (0..SENDERS)
            .map(|s| {
                let start = &start;
                scope.spawn(move || -> Result<()> {
                    start.wait();
                    for i in 0..PER_SENDER {
                        let text = format!("{s}:{i}");
                        if bulk && i % 3 == 0 {
                            // Some sends reach this user through a bulk send.
                            store.message_users([7_u64, 8, 9], text, Level::Info)?;
                        } else {
                            store.message_user(7_u64, text, Level::Info)?;
                        }
                        // Without a pause, senders can hold the user's lock
                        // stripe back to back and drainers get few turns.
                        thread::yield_now();
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
    let drains: Vec<Drain> = drains.into_iter().flatten().collect();

    // Every message once, none lost: identities, not counts.
    let mut seen: HashMap<(usize, usize), usize> = HashMap::new();
    for drain in &drains {
        for message in &drain.messages {
            *seen.entry(*message).or_default() += 1;
        }
    }
    for s in 0..SENDERS {
        for i in 0..PER_SENDER {
            match seen.get(&(s, i)) {
                Some(1) => {}
                Some(n) => panic!("message {s}:{i} delivered {n} times"),
                None => panic!("message {s}:{i} never delivered"),
            }
        }
    }
    assert_eq!(seen.len(), SENDERS * PER_SENDER, "nothing else delivered");
    if let Err(problem) = check_order(&drains) {
        panic!("{problem}");
    }
    println!(
        "{} non-empty drains by {DRAINERS} drainers, in order",
        drains.len()
    );
    assert!(store.get_messages(7_u64)?.is_empty());
    Ok(())
}

fn senders_and_drainers_on_one_user_deliver_each_message_exactly_once(
    engine: Engine,
) -> Result<()> {
    run(engine.open_fast()?.store(), false)
}

/// Durable writes on sled (`Durability::Immediate`, the default); the other
/// engines have no such setting (Redis is as durable as its server's AOF).
fn exactly_once_holds_with_bulk_sends_and_durable_writes(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    run(&store, true)?;
    // The other bulk recipients got every bulk message once.
    let eight = store.get_messages(8_u64)?;
    assert_eq!(eight.len(), SENDERS * PER_SENDER.div_ceil(3));
    Ok(())
}

engine_tests! {
    senders_and_drainers_on_one_user_deliver_each_message_exactly_once,
    exactly_once_holds_with_bulk_sends_and_durable_writes,
}

/// The control: the order check catches each way a drain history can break
/// the order, and passes a correct one.
#[test]
fn the_order_check_catches_out_of_order_drains() {
    let drain = |called, returned, messages: &[(usize, usize)]| Drain {
        called,
        returned,
        messages: messages.to_vec(),
    };
    // Correct: sequential drains, and two overlapping ones in either order.
    let good = [
        drain(0, 1, &[(0, 0), (1, 0)]),
        drain(2, 5, &[(0, 2), (1, 1)]),
        drain(3, 4, &[(0, 1)]),
        drain(6, 7, &[(1, 2), (0, 3)]),
    ];
    assert_eq!(check_order(&good), Ok(()));
    let cases: [(&str, Vec<Drain>); 4] = [
        (
            "a later drain delivered earlier messages",
            vec![drain(0, 1, &[(0, 1)]), drain(2, 3, &[(0, 0)])],
        ),
        (
            "interleave",
            vec![drain(0, 3, &[(0, 0), (0, 2)]), drain(1, 2, &[(0, 1)])],
        ),
        (
            "says the other",
            vec![
                drain(0, 3, &[(0, 0), (1, 1)]),
                drain(1, 2, &[(0, 1), (1, 0)]),
            ],
        ),
        ("after 1", vec![drain(0, 1, &[(0, 1), (0, 0)])]),
    ];
    for (expected, drains) in cases {
        let problem = check_order(&drains).expect_err("an out-of-order history passed");
        assert!(problem.contains(expected), "{problem}");
    }
}

fn parse(text: &str) -> (usize, usize) {
    let (sender, index) = text.split_once(':').expect("texts are sender:index");
    (
        sender.parse().expect("sender is a number"),
        index.parse().expect("index is a number"),
    )
}
