//! Large bulk sends (more than 256 recipients) are stored once, as one
//! record with the recipient set, and delivered by membership: every
//! guarantee of per-recipient records holds for them, mixed with direct
//! messages.

mod common;

use std::collections::HashMap;

use async_messages::{Level, Result, UserId};
use common::engines::Engine;
use common::{TestDir, raw_db, texts};

/// More than the threshold at which a send becomes one shared record.
const MANY: u64 = 1_000;

fn many_ints() -> std::ops::Range<u64> {
    0..MANY
}

fn a_large_bulk_send_reaches_every_recipient_once(engine: Engine) -> Result<()> {
    let store = engine.open_fast()?;
    let users: Vec<UserId> = many_ints()
        .map(UserId::from)
        .chain((0..MANY).map(|i| UserId::from(format!("user-{i}"))))
        .chain([
            UserId::from(""),
            UserId::from("a\0b"),
            UserId::from(u64::MAX),
        ])
        .collect();
    let sent = store.message_users(users.clone(), "all hands", Level::Warning)?;
    assert_eq!(sent.recipients(), users.len() as u64);
    for user in &users {
        let got = store.get_messages(user)?;
        assert_eq!(texts(&got), ["all hands"], "{user}");
        assert_eq!(got[0].level(), Level::Warning);
        assert_eq!(Some(got[0].id()), sent.id());
        assert!(store.get_messages(user)?.is_empty(), "{user} got it twice");
    }
    // Users not listed get nothing, including near misses.
    for user in [UserId::from(MANY), UserId::from("user-"), UserId::from("0")] {
        assert!(
            store.get_messages(&user)?.is_empty(),
            "{user} was not listed"
        );
    }
    Ok(())
}

fn bulk_and_direct_messages_come_back_in_send_order(engine: Engine) -> Result<()> {
    let store = engine.open_fast()?;
    store.info(5_u64, "first")?;
    store.message_users(many_ints(), "second (bulk)", Level::Info)?;
    store.info(5_u64, "third")?;
    store.message_users(many_ints().rev(), "fourth (bulk)", Level::Info)?;
    store.message_users([5_u64, 6], "fifth (small bulk)", Level::Info)?;
    store.info(5_u64, "sixth")?;
    let want = [
        "first",
        "second (bulk)",
        "third",
        "fourth (bulk)",
        "fifth (small bulk)",
        "sixth",
    ];
    assert_eq!(texts(&store.peek(5_u64)?), want);
    assert_eq!(store.count(5_u64)?, 6);
    assert!(store.may_have_messages(5_u64));
    assert_eq!(texts(&store.get_messages(5_u64)?), want);
    assert_eq!(store.count(5_u64)?, 0);
    // Another recipient still has both bulk messages.
    assert_eq!(
        texts(&store.get_messages(7_u64)?),
        ["second (bulk)", "fourth (bulk)"]
    );
    Ok(())
}

fn the_empty_queue_stays_empty_after_a_user_takes_a_bulk_message(engine: Engine) -> Result<()> {
    // One slot per user here, so "may have" is exact on sled (the other
    // engines answer it exactly anyway).
    let store = engine.open_with(|builder| builder.index_slots(1 << 16))?;
    assert!(!store.may_have_messages(3_u64));
    store.message_users(many_ints(), "hello", Level::Info)?;
    assert!(store.may_have_messages(3_u64));
    store.get_messages(3_u64)?;
    assert!(
        store.peek(3_u64)?.is_empty(),
        "taken messages are not peeked"
    );
    // The counter went back down (with this many slots, user 3 shares its
    // slot with no other recipient).
    assert!(!store.may_have_messages(3_u64));
    let still: Vec<u64> = many_ints()
        .filter(|&u| u != 3 && store.may_have_messages(u))
        .collect();
    assert_eq!(still.len() as u64, MANY - 1, "the others still have it");
    Ok(())
}

fn a_user_listed_twice_gets_one_copy(engine: Engine) -> Result<()> {
    let store = engine.open_fast()?;
    let users = many_ints().chain(many_ints()).map(UserId::from);
    let strings = (0..300)
        .chain(0..300)
        .map(|i| UserId::from(format!("s{i}")));
    let sent = store.message_users(users.chain(strings), "once", Level::Info)?;
    assert_eq!(sent.recipients(), MANY + 300);
    assert_eq!(texts(&store.get_messages(9_u64)?), ["once"]);
    assert_eq!(texts(&store.get_messages("s9")?), ["once"]);
    assert!(store.get_messages(9_u64)?.is_empty());
    Ok(())
}

fn an_invalid_id_anywhere_in_a_large_send_stores_nothing(engine: Engine) -> Result<()> {
    let store = engine.open_fast()?;
    let long = UserId::from("x".repeat(UserId::MAX_STR_BYTES + 1));
    let users = many_ints()
        .map(UserId::from)
        .chain([long])
        .chain(many_ints().map(|i| UserId::from(i + MANY)));
    let refused = store.message_users(users, "never", Level::Info);
    assert!(
        matches!(refused, Err(async_messages::Error::UserIdTooLong { .. })),
        "{refused:?}"
    );
    assert!(store.peek(0_u64)?.is_empty());
    assert!(store.peek(MANY + 1)?.is_empty());
    Ok(())
}

fn leases_hide_bulk_messages_and_a_release_gives_them_back(engine: Engine) -> Result<()> {
    let store = engine.open_fast()?;
    store.info(1_u64, "direct before")?;
    store.message_users(many_ints(), "bulk", Level::Info)?;
    let lease = store.lease_messages(1_u64)?;
    assert_eq!(texts(lease.messages()), ["direct before", "bulk"]);
    store.info(1_u64, "direct after")?;
    // Another drain sees only what is not leased.
    let other = store.lease_messages(1_u64)?;
    assert_eq!(texts(other.messages()), ["direct after"]);
    other.release();
    lease.release();
    // Back in their original place in the order.
    let lease = store.lease_messages(1_u64)?;
    assert_eq!(
        texts(lease.messages()),
        ["direct before", "bulk", "direct after"]
    );
    drop(lease);
    let lease = store.lease_messages(1_u64)?;
    assert_eq!(lease.messages().len(), 3, "a dropped lease gives back too");
    assert_eq!(lease.commit()?.len(), 3);
    assert!(store.get_messages(1_u64)?.is_empty(), "committed for good");
    assert_eq!(texts(&store.get_messages(2_u64)?), ["bulk"]);
    Ok(())
}

/// Not on memory, which has no reopen.
fn a_reopened_store_remembers_who_took_a_bulk_message(engine: Engine) -> Result<()> {
    let mut store = engine.open()?;
    store.message_users(many_ints(), "remember me", Level::Info)?;
    store.message_users((0..MANY).map(|i| format!("u{i}")), "strings", Level::Info)?;
    for user in 0..MANY / 2 {
        assert_eq!(store.get_messages(user)?.len(), 1);
    }
    assert_eq!(store.get_messages("u1")?.len(), 1);
    store.reopen()?;
    for user in 0..MANY / 2 {
        assert!(store.get_messages(user)?.is_empty(), "user {user} again");
    }
    assert!(store.get_messages("u1")?.is_empty());
    for user in MANY / 2..MANY {
        assert_eq!(texts(&store.get_messages(user)?), ["remember me"]);
    }
    assert_eq!(texts(&store.get_messages("u2")?), ["strings"]);
    Ok(())
}

engine_tests! {
    a_large_bulk_send_reaches_every_recipient_once,
    bulk_and_direct_messages_come_back_in_send_order,
    the_empty_queue_stays_empty_after_a_user_takes_a_bulk_message,
    a_user_listed_twice_gets_one_copy,
    an_invalid_id_anywhere_in_a_large_send_stores_nothing,
    leases_hide_bulk_messages_and_a_release_gives_them_back,
    a_reopened_store_remembers_who_took_a_bulk_message: Sled | Redis,
    concurrent_drains_take_each_bulk_message_once_and_in_order,
}

/// Counts the records the store keeps in sled, once it is closed.
fn leftovers(dir: &TestDir) -> (usize, usize) {
    let db = raw_db(&dir.store_path());
    let bulk = db.open_tree("bulk").expect("bulk tree").len();
    let messages = db.open_tree("messages").expect("messages tree").len();
    (bulk, messages)
}

#[test]
fn a_bulk_record_and_its_marks_go_once_every_recipient_took_it() -> Result<()> {
    let dir = TestDir::new();
    {
        let store = dir.open_fast()?;
        store.message_users(0..10_000_u64, "to many", Level::Info)?;
        store.message_users(0..300_u64, "to fewer", Level::Info)?;
        for user in 0..300_u64 {
            assert_eq!(store.get_messages(user)?.len(), 2);
        }
    }
    // "to fewer" is gone; "to many" stays, with 300 marks at most.
    let (bulk, marks) = leftovers(&dir);
    assert_eq!(bulk, 1);
    assert!(marks <= 300, "{marks} marks");
    {
        let store = dir.open_fast()?;
        for user in 300..10_000_u64 {
            assert_eq!(texts(&store.get_messages(user)?), ["to many"], "{user}");
        }
    }
    assert_eq!(leftovers(&dir), (0, 0), "nothing left once all took it");
    let store = dir.open_fast()?;
    assert!(store.get_messages(5_u64)?.is_empty());
    Ok(())
}

#[test]
fn marks_are_folded_into_the_record_while_others_still_wait() -> Result<()> {
    let dir = TestDir::new();
    {
        let store = dir.open_fast()?;
        store.message_users(0..20_000_u64, "folded", Level::Info)?;
        for user in 0..15_000_u64 {
            assert_eq!(store.get_messages(user)?.len(), 1);
        }
    }
    let (bulk, marks) = leftovers(&dir);
    assert_eq!(bulk, 1);
    assert!(
        marks < 8_000,
        "{marks} marks: taken users should be folded out of the record"
    );
    let store = dir.open_fast()?;
    for user in 0..15_000_u64 {
        assert!(store.get_messages(user)?.is_empty(), "{user} got it twice");
    }
    for user in 15_000..20_000_u64 {
        assert_eq!(texts(&store.get_messages(user)?), ["folded"], "{user}");
    }
    Ok(())
}

#[test]
fn a_damaged_bulk_record_is_quarantined_and_the_rest_is_kept() -> Result<()> {
    let dir = TestDir::new();
    {
        let store = dir.open_fast()?;
        store.info(1_u64, "direct")?;
        store.message_users(many_ints(), "damaged", Level::Info)?;
        store.message_users(many_ints(), "intact", Level::Info)?;
    }
    {
        let db = raw_db(&dir.store_path());
        let bulk = db.open_tree("bulk").expect("bulk tree");
        let (key, value) = bulk.iter().next().expect("a record").expect("readable");
        let mut damaged = value.to_vec();
        damaged.truncate(damaged.len() - 3);
        bulk.insert(key, damaged).expect("insert");
        db.flush().expect("flush");
    }
    let store = dir.open_fast()?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["direct", "intact"]);
    assert_eq!(texts(&store.get_messages(2_u64)?), ["intact"]);
    let quarantined = store.quarantined()?;
    assert_eq!(quarantined.len(), 1);
    assert_eq!(quarantined[0].tree(), "bulk");
    Ok(())
}

/// Drainers and leases race on users holding bulk and direct messages from
/// two senders: every message reaches exactly one drain, and a drain that
/// started after another ended never delivers an earlier message of the same
/// sender, unless a lease held that earlier message while the other drain
/// ran and then released it (a drain skips leased messages; a released one
/// goes back to its place, ahead of what that drain took). That history is
/// correct on every engine; its window is a lease's lifetime, microseconds
/// on sled and in memory (not seen there in 20 runs) but round trips on
/// Redis, where the check without this exception failed a correct engine.
fn concurrent_drains_take_each_bulk_message_once_and_in_order(engine: Engine) -> Result<()> {
    const USERS: u64 = 8;
    const ROUNDS: u64 = 40;
    let store = engine.open_fast()?;
    // Every bulk send lists the racing users among many others.
    let recipients = || (0..USERS).chain(1_000..1_400);
    let clock = std::sync::atomic::AtomicU64::new(0);
    let tick = || clock.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let drains = parking_lot::Mutex::new(Vec::<Drain>::new());
    // Leases released instead of committed, with what they held.
    let released = parking_lot::Mutex::new(Vec::<Drain>::new());
    std::thread::scope(|scope| -> Result<()> {
        let mut handles = Vec::new();
        for sender in 0..2_u64 {
            let store = store.clone();
            handles.push(scope.spawn(move || -> Result<()> {
                for round in 0..ROUNDS {
                    let text = format!("{sender}:{round}");
                    if round % 2 == 0 {
                        store.message_users(recipients(), text, Level::Info)?;
                    } else {
                        for user in 0..USERS {
                            store.info(user, text.clone())?;
                        }
                    }
                }
                Ok(())
            }));
        }
        for drainer in 0..3_u64 {
            let store = store.clone();
            let (drains, released, tick) = (&drains, &released, &tick);
            handles.push(scope.spawn(move || -> Result<()> {
                for step in 0..ROUNDS * 6 {
                    let user = (step + drainer) % USERS;
                    let start = tick();
                    let got = if drainer == 0 {
                        let lease = store.lease_messages(user)?;
                        if step % 3 == 0 {
                            let held = lease.messages().to_vec();
                            lease.release();
                            let end = tick();
                            released.lock().push(Drain::new(user, start, end, held));
                            Vec::new()
                        } else {
                            lease.commit()?
                        }
                    } else {
                        store.get_messages(user)?
                    };
                    let end = tick();
                    drains.lock().push(Drain::new(user, start, end, got));
                }
                Ok(())
            }));
        }
        for handle in handles {
            handle.join().expect("thread")?;
        }
        Ok(())
    })?;
    let mut drains = drains.into_inner();
    let released = released.into_inner();
    for user in 0..USERS {
        let start = tick();
        let got = store.get_messages(user)?;
        drains.push(Drain::new(user, start, tick(), got));
    }
    let mut seen: HashMap<(u64, (u64, u64)), u64> = HashMap::new();
    for drain in &drains {
        for message in &drain.messages {
            *seen.entry((drain.user, *message)).or_default() += 1;
        }
        for pair in drain.messages.windows(2) {
            if pair[0].0 == pair[1].0 {
                assert!(
                    pair[0].1 < pair[1].1,
                    "out of order within a drain: {pair:?}"
                );
            }
        }
    }
    for user in 0..USERS {
        for sender in 0..2 {
            for round in 0..ROUNDS {
                let count = seen.get(&(user, (sender, round))).copied();
                assert_eq!(count, Some(1), "user {user}, message {sender}:{round}");
            }
        }
    }
    for a in &drains {
        for b in drains
            .iter()
            .filter(|b| b.user == a.user && a.end < b.start)
        {
            for &(sender, later) in &b.messages {
                // Held by a lease that overlapped `a` and was released.
                let was_leased = released.iter().any(|r| {
                    r.user == a.user
                        && r.start < a.end
                        && a.start < r.end
                        && r.messages.contains(&(sender, later))
                });
                if was_leased {
                    continue;
                }
                if let Some(&(_, earlier)) =
                    a.messages.iter().find(|m| m.0 == sender && m.1 > later)
                {
                    panic!(
                        "user {}: a later drain delivered {sender}:{later} after an earlier one delivered {sender}:{earlier}",
                        a.user
                    );
                }
            }
        }
    }
    Ok(())
}

/// One drain: whose, when it started and ended (a shared clock), and the
/// (sender, round) of each message it returned.
struct Drain {
    user: u64,
    start: u64,
    end: u64,
    messages: Vec<(u64, u64)>,
}

impl Drain {
    fn new(user: u64, start: u64, end: u64, got: Vec<async_messages::Message>) -> Drain {
        let messages = got
            .iter()
            .map(|m| {
                let (sender, round) = m.text().split_once(':').expect("sender:round");
                (
                    sender.parse().expect("sender"),
                    round.parse().expect("round"),
                )
            })
            .collect();
        Drain {
            user,
            start,
            end,
            messages,
        }
    }
}

/// A drain that takes a bulk message commits with one write, its taken
/// mark, which lists the user's records it removes: a crash after the mark
/// and before the removals must not deliver those records again.
#[test]
fn a_drain_cut_off_after_its_mark_is_finished_at_open() -> Result<()> {
    let dir = TestDir::new();
    {
        let store = dir.open()?;
        store.info(1_u64, "direct before")?;
        store.message_users(many_ints(), "bulk", Level::Info)?;
        store.info(1_u64, "direct after")?;
    }
    let user_records = || -> Vec<(::sled::IVec, ::sled::IVec)> {
        let db = raw_db(&dir.store_path());
        let tree = db.open_tree("messages").expect("messages tree");
        let mut prefix = vec![1_u8];
        prefix.extend_from_slice(&1_u64.to_be_bytes());
        tree.scan_prefix(prefix)
            .map(|r| r.expect("readable"))
            .collect()
    };
    let before = user_records();
    assert_eq!(before.len(), 2, "two direct records");
    {
        let store = dir.open()?;
        assert_eq!(
            texts(&store.get_messages(1_u64)?),
            ["direct before", "bulk", "direct after"]
        );
    }
    assert_eq!(user_records().len(), 1, "only the taken mark is left");
    // The state a crash between the mark and the removals leaves.
    {
        let db = raw_db(&dir.store_path());
        let tree = db.open_tree("messages").expect("messages tree");
        for (key, value) in &before {
            tree.insert(key, value).expect("insert");
        }
        db.flush().expect("flush");
    }
    let store = dir.open()?;
    assert!(
        store.get_messages(1_u64)?.is_empty(),
        "a committed drain came back"
    );
    assert!(store.peek(1_u64)?.is_empty());
    drop(store);
    assert_eq!(user_records().len(), 1, "the removals were finished");
    Ok(())
}
