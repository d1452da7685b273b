//! Expiry, replace keys and announcements on sled: what only a store on
//! disk can show. Expired records leave the disk without anyone reading
//! (the reaper), the disk shrinks back, announcements survive a reopen,
//! and the `expiry` tree is put right at open after damage or a crash.

mod common;

use std::time::{Duration, Instant};

use async_messages::{Durability, Level, ManualClock, MessageStore, Result};
use common::{TestDir, raw_db, texts};

const HOUR: Duration = Duration::from_secs(3600);

/// A generous deadline for the background reaper (it runs every second).
const REAPED_WITHIN: Duration = Duration::from_secs(60);

fn open(dir: &TestDir, clock: &ManualClock) -> Result<MessageStore> {
    MessageStore::builder()
        .path(dir.store_path())
        .durability(Durability::Periodic(Duration::from_millis(100)))
        .clock(clock.clone())
        .open()
}

/// Waits until `done` holds, polling; panics with `what` after the deadline.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < REAPED_WITHIN,
            "not within {REAPED_WITHIN:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Records left in each tree of a closed store.
#[derive(Debug, PartialEq, Eq)]
struct Left {
    messages: usize,
    texts: usize,
    bulk: usize,
    expiry: usize,
}

fn left(dir: &TestDir) -> Left {
    let db = raw_db(&dir.store_path());
    let len = |name: &str| db.open_tree(name).expect("tree").len();
    Left {
        messages: len("messages"),
        texts: len("texts"),
        bulk: len("bulk"),
        expiry: len("expiry"),
    }
}

const NOTHING: Left = Left {
    messages: 0,
    texts: 0,
    bulk: 0,
    expiry: 0,
};

#[test]
fn expired_messages_leave_the_disk_without_anyone_reading() -> Result<()> {
    let dir = TestDir::new();
    let clock = ManualClock::new();
    {
        let store = open(&dir, &clock)?;
        for user in 0..50_u64 {
            store
                .compose("inline", Level::Info)
                .expires_after(HOUR)
                .to_user(user)?;
        }
        store
            .compose("to a few", Level::Info)
            .expires_after(HOUR)
            .to_users(0..10_u64)?;
        store
            .compose("to many", Level::Info)
            .expires_after(HOUR)
            .to_users(0..1_000_u64)?;
        store
            .compose("to everyone", Level::Info)
            .expires_after(HOUR)
            .to_everyone()?;
        // Taken by some before it expires: their marks go with it.
        for user in 900..1_000_u64 {
            assert_eq!(
                texts(&store.get_messages(user)?),
                ["to many", "to everyone"]
            );
        }
        store.info(7_u64, "kept")?;
        assert!(store.may_have_messages(5_u64));
        clock.advance(HOUR);
        // Nobody reads: the reaper empties every queue.
        eventually("every expired message reaped", || {
            (0..1_000_u64)
                .filter(|user| *user != 7)
                .all(|user| !store.may_have_messages(user))
        });
        eventually("the bulk record reaped", || {
            store.stats().is_ok_and(|stats| stats.bulk_records == 0)
        });
        assert!(store.may_have_messages(7_u64));
        assert!(!store.may_have_messages(123_456_u64));
    }
    assert_eq!(
        left(&dir),
        Left {
            messages: 1,
            ..NOTHING
        },
        "only the message without expiry stays"
    );
    let store = open(&dir, &clock)?;
    assert_eq!(texts(&store.get_messages(7_u64)?), ["kept"]);
    assert!(store.get_messages(5_u64)?.is_empty());
    Ok(())
}

#[test]
fn a_user_who_took_an_announcement_never_gets_it_again_after_a_reopen() -> Result<()> {
    let dir = TestDir::new();
    let clock = ManualClock::new();
    {
        let store = open(&dir, &clock)?;
        store.info(1_u64, "before")?;
        store
            .compose("maintenance tonight", Level::Warning)
            .to_everyone()?;
        store.info(1_u64, "after")?;
        assert!(store.may_have_messages(2_u64), "a user never seen");
        assert_eq!(
            texts(&store.get_messages(1_u64)?),
            ["before", "maintenance tonight", "after"]
        );
        assert_eq!(texts(&store.get_messages(2_u64)?), ["maintenance tonight"]);
        assert!(store.get_messages(2_u64)?.is_empty());
        assert!(!store.may_have_messages(2_u64));
        assert_eq!(store.stats()?.bulk_records, 0, "not a bulk send");
    }
    let store = open(&dir, &clock)?;
    assert!(store.get_messages(1_u64)?.is_empty());
    assert!(store.get_messages(2_u64)?.is_empty());
    assert!(!store.may_have_messages(2_u64));
    assert_eq!(
        texts(&store.get_messages("never-seen")?),
        ["maintenance tonight"]
    );
    Ok(())
}

#[test]
fn announcement_takers_are_folded_into_the_record_and_stay_taken() -> Result<()> {
    let dir = TestDir::new();
    let clock = ManualClock::new();
    let takers = 10_000_u64;
    {
        let store = open(&dir, &clock)?;
        store.compose("to everyone", Level::Info).to_everyone()?;
        for user in 0..takers {
            assert_eq!(store.get_messages(user)?.len(), 1, "{user}");
        }
    }
    let after = left(&dir);
    assert_eq!(after.bulk, 1);
    assert!(
        after.messages < 5_000,
        "{} marks: takers should be folded into the record",
        after.messages
    );
    let store = open(&dir, &clock)?;
    for user in 0..takers {
        assert!(store.get_messages(user)?.is_empty(), "{user} got it twice");
    }
    assert_eq!(texts(&store.get_messages(takers)?), ["to everyone"]);
    Ok(())
}

#[test]
fn a_keyed_send_removes_the_older_record_from_disk() -> Result<()> {
    let dir = TestDir::new();
    let clock = ManualClock::new();
    {
        let store = open(&dir, &clock)?;
        for n in 1..=5 {
            store
                .compose(format!("{n} new comments"), Level::Info)
                .replace_key("comments")
                .to_user(1_u64)?;
            store
                .compose(format!("{n} for a few"), Level::Info)
                .replace_key("few")
                .to_users([1_u64, 2])?;
        }
    }
    assert_eq!(
        left(&dir),
        Left {
            messages: 3,
            texts: 1,
            ..NOTHING
        }
    );
    let store = open(&dir, &clock)?;
    assert_eq!(
        texts(&store.get_messages(1_u64)?),
        ["5 new comments", "5 for a few"]
    );
    assert_eq!(texts(&store.get_messages(2_u64)?), ["5 for a few"]);
    Ok(())
}

#[test]
fn an_expired_keyed_bulk_send_still_replaces_older_copies_once_reaped() -> Result<()> {
    let dir = TestDir::new();
    let clock = ManualClock::new();
    let store = open(&dir, &clock)?;
    store
        .compose("old report", Level::Info)
        .replace_key("report")
        .to_user(5_u64)?;
    store
        .compose("new report", Level::Info)
        .replace_key("report")
        .expires_after(HOUR)
        .to_users(0..1_000_u64)?;
    clock.advance(HOUR);
    eventually("the bulk record reaped", || {
        store.stats().is_ok_and(|stats| stats.bulk_records == 0)
    });
    assert!(store.get_messages(5_u64)?.is_empty());
    Ok(())
}

#[test]
fn the_expiry_tree_is_put_right_at_open() -> Result<()> {
    let dir = TestDir::new();
    let clock = ManualClock::new();
    {
        let store = open(&dir, &clock)?;
        store
            .compose("expiring", Level::Info)
            .expires_after(HOUR)
            .to_user(1_u64)?;
        store
            .compose("expiring, shared", Level::Info)
            .expires_after(HOUR)
            .to_users([2_u64, 3])?;
        store
            .compose("drained", Level::Info)
            .expires_after(HOUR)
            .to_user(4_u64)?;
        assert_eq!(store.get_messages(4_u64)?.len(), 1);
    }
    assert_eq!(left(&dir).expiry, 3, "one entry per expiring record");
    {
        // Lose the entries (as a bug or damage would), and add one without
        // a record (as a crash between the entry and its record would).
        let db = raw_db(&dir.store_path());
        let expiry = db.open_tree("expiry").expect("tree");
        expiry.clear().expect("clear");
        let mut orphan = 1_u64.to_be_bytes().to_vec();
        orphan.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1]);
        expiry.insert(orphan, &[][..]).expect("insert");
        db.flush().expect("flush");
    }
    {
        let store = open(&dir, &clock)?;
        clock.advance(HOUR);
        eventually("the expired messages reaped", || {
            (1..=3_u64).all(|user| !store.may_have_messages(user))
        });
        // One more round, for the orphan entry (due long ago).
        std::thread::sleep(Duration::from_millis(1_500));
    }
    assert_eq!(left(&dir), NOTHING);
    Ok(())
}

#[test]
fn a_leased_message_is_not_reaped_until_its_lease_ends() -> Result<()> {
    let dir = TestDir::new();
    let clock = ManualClock::new();
    let store = open(&dir, &clock)?;
    store
        .compose("expiring", Level::Info)
        .expires_after(HOUR)
        .to_user(1_u64)?;
    store
        .compose("expiring bulk", Level::Info)
        .expires_after(HOUR)
        .to_users(0..1_000_u64)?;
    let lease = store.lease_messages(1_u64)?;
    assert_eq!(lease.messages().len(), 2);
    clock.advance(HOUR);
    // The bulk record goes; the leased record waits for its lease.
    eventually("the bulk record reaped", || {
        store.stats().is_ok_and(|stats| stats.bulk_records == 0)
    });
    assert!(store.may_have_messages(1_u64));
    assert_eq!(lease.commit()?.len(), 2, "shown when leased, so delivered");
    assert!(!store.may_have_messages(1_u64), "the index is exact again");
    assert!(store.get_messages(1_u64)?.is_empty());
    Ok(())
}

#[test]
fn a_released_lease_wakes_the_users_watchers() -> Result<()> {
    let dir = TestDir::new();
    let clock = ManualClock::new();
    let store = open(&dir, &clock)?;
    store.info(1_u64, "hello")?;
    let lease = store.lease_messages(1_u64)?;
    let mut watch = store.watch(1_u64)?;
    lease.release();
    assert!(watch.wait_timeout(Duration::from_secs(10)), "no wake-up");
    assert_eq!(texts(&store.get_messages(1_u64)?), ["hello"]);
    Ok(())
}

/// The promise: once everything has expired, the disk comes back
/// to within 4 MiB of an empty store, without anyone calling anything.
#[test]
fn the_disk_shrinks_back_once_everything_expired() -> Result<()> {
    const MIB: u64 = 1 << 20;
    let empty = {
        let dir = TestDir::new();
        let store = open(&dir, &ManualClock::new())?;
        store.flush()?;
        store.size_on_disk()?
    };
    let dir = TestDir::new();
    let clock = ManualClock::new();
    let store = open(&dir, &clock)?;
    let text = "x".repeat(900);
    let users = 2_000_u64;
    for round in 0..12_u64 {
        for user in 0..users {
            store
                .compose(format!("{round} {text}"), Level::Info)
                .expires_after(HOUR)
                .to_user(user)?;
        }
    }
    for first in (0..200_u64).step_by(10) {
        store
            .compose(format!("few {text}"), Level::Info)
            .expires_after(HOUR)
            .to_users(first..first + 10)?;
    }
    store
        .compose(format!("bulk {text}"), Level::Info)
        .expires_after(HOUR)
        .to_users(0..100_000_u64)?;
    store
        .compose(format!("announcement {text}"), Level::Info)
        .expires_after(HOUR)
        .to_everyone()?;
    for user in 0..500_u64 {
        assert_eq!(store.get_messages(user + 10_000)?.len(), 2);
    }
    store.flush()?;
    let full = store.size_on_disk()?;
    assert!(full > empty + 20 * MIB, "{full} bytes is not a full store");
    clock.advance(HOUR);
    let started = Instant::now();
    let mut size = full;
    eventually("the disk shrinks back", || {
        size = store.size_on_disk().unwrap_or(u64::MAX);
        size <= empty + 4 * MIB
    });
    println!(
        "empty {empty} B, full {full} B, back to {size} B after {:?}",
        started.elapsed()
    );
    assert!(store.get_messages(0_u64)?.is_empty());
    Ok(())
}

/// Bulk sends expire and are reaped while users drain, and lease and
/// commit or release, the others: the index stays an upper bound (never
/// reports a user with a queued message empty) and ends exact.
#[test]
fn reaping_bulk_sends_beside_drains_and_leases_keeps_the_index_exact() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = TestDir::new();
    let clock = ManualClock::new();
    // One index slot: it counts every queued message, so a message taken
    // off twice shows as the anchor's message not counted, and one never
    // taken off as users reported non-empty at the end.
    let store = MessageStore::builder()
        .path(dir.store_path())
        .durability(Durability::Periodic(Duration::from_millis(100)))
        .clock(clock.clone())
        .index_slots(1)
        .open()?;
    let users = 3_000_u64;
    let anchor = users;
    store.info(anchor, "anchor")?;
    for bulk in 1..=20_u64 {
        store
            .compose(format!("bulk {bulk}"), Level::Info)
            .expires_after(Duration::from_millis(50 * bulk))
            .to_users(0..users)?;
    }
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..3_u64)
        .map(|thread| {
            let store = store.clone();
            let stop = stop.clone();
            std::thread::spawn(move || -> Result<()> {
                let mut user = thread;
                while !stop.load(Ordering::Acquire) {
                    let lease = store.lease_messages(user % users)?;
                    match thread {
                        0 => drop(store.get_messages(user % users)?),
                        // Held across a reap now and then, committed or
                        // released (back in the queue).
                        1 => {
                            std::thread::sleep(Duration::from_millis(20));
                            drop(lease.commit()?);
                        }
                        _ => {
                            std::thread::sleep(Duration::from_millis(20));
                            lease.release();
                        }
                    }
                    user += 3;
                }
                Ok(())
            })
        })
        .collect();
    // The bulk sends expire one after the other while the reaper runs.
    for _ in 0..1_200 {
        clock.advance(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(1));
    }
    eventually("every bulk record reaped", || {
        store.stats().is_ok_and(|stats| stats.bulk_records == 0)
    });
    stop.store(true, Ordering::Release);
    for worker in workers {
        worker.join().expect("worker")?;
    }
    assert!(
        store.may_have_messages(anchor),
        "the index under-counts: a message was taken off it twice"
    );
    assert_eq!(texts(&store.get_messages(anchor)?), ["anchor"]);
    eventually("the index exact again", || {
        (0..=users).all(|user| !store.may_have_messages(user))
    });
    for user in 0..users {
        assert!(store.get_messages(user)?.is_empty(), "{user}");
    }
    Ok(())
}

/// The child of the crash test: sends keyed, expiring messages and
/// announcements and drains, printing each drain once it returned, until
/// killed.
#[test]
#[ignore = "the child of a_crash_leaves_nothing_expired_shown_and_everything_reaped"]
fn expiry_crash_child() -> Result<()> {
    let path = std::env::var("EXPIRY_CRASH_STORE").expect("store path");
    let store = MessageStore::open(path)?;
    let mut seq = 0_u64;
    loop {
        seq += 1;
        let user = seq % 20;
        store
            .compose(format!("s{seq}"), Level::Info)
            .replace_key(format!("k{}", seq % 3))
            .expires_after(Duration::from_millis(300 + seq % 700))
            .to_user(user)?;
        if seq.is_multiple_of(7) {
            store
                .compose(format!("s{seq}"), Level::Info)
                .expires_after(Duration::from_millis(500))
                .to_users((0..300_u64).map(|u| u + user))?;
        }
        if seq.is_multiple_of(50) {
            let id = store
                .compose(format!("a{seq}"), Level::Info)
                .expires_after(Duration::from_secs(2))
                .to_everyone()?;
            common::child::say(format!("announced {}", id.get()));
        }
        if seq.is_multiple_of(3) {
            let taken = store.get_messages(user)?;
            let ids: Vec<String> = taken.iter().map(|m| m.id().get().to_string()).collect();
            common::child::say(format!("drained {user} {}", ids.join(",")));
        }
    }
}

#[test]
fn a_crash_leaves_nothing_expired_shown_and_everything_reaped() -> Result<()> {
    let dir = TestDir::new();
    let mut taken: std::collections::HashSet<(u64, u64)> = Default::default();
    let mut announced: std::collections::HashSet<u64> = Default::default();
    for cycle in 0..4_u64 {
        let mut command = common::child::command("expiry_crash_child");
        command.env("EXPIRY_CRASH_STORE", dir.store_path());
        let mut child = common::child::Running::spawn(command);
        let drains = 20 + 15 * cycle as usize;
        let seen_drains =
            |lines: &[String]| lines.iter().filter(|l| l.starts_with("drained")).count();
        while seen_drains(&child.seen) < drains {
            if child.wait_for(|line| line.starts_with("drained")).is_err() {
                panic!("the child stopped: {:?}", common::child::tail(&child.seen));
            }
        }
        let (_, lines) = child.kill();
        for line in &lines {
            let mut parts = line.split(' ');
            let what = parts.next();
            if what == Some("announced") {
                announced.insert(parts.next().expect("id").parse::<u64>().expect("id"));
            }
            if what == Some("drained") {
                let user: u64 = parts.next().expect("user").parse().expect("user");
                for id in parts
                    .next()
                    .unwrap_or("")
                    .split(',')
                    .filter(|s| !s.is_empty())
                {
                    taken.insert((user, id.parse().expect("id")));
                }
            }
        }
        // Reopen right away: whatever is shown has not expired, each key
        // at most once, and nothing taken before the crash comes back.
        let store = MessageStore::open(dir.store_path())?;
        let now = std::time::SystemTime::now();
        for user in 0..20_u64 {
            let messages = store.peek(user)?;
            let mut keys = std::collections::HashSet::new();
            for message in &messages {
                if let Some(at) = message.expires_at() {
                    assert!(
                        at > now - Duration::from_millis(5),
                        "{user}: expired {message:?}"
                    );
                }
                if let Some(key) = message.replace_key() {
                    assert!(keys.insert(key.to_owned()), "{user}: key {key} twice");
                }
                assert!(
                    !taken.contains(&(user, message.id().get())),
                    "{user}: {message:?} was drained before the crash"
                );
            }
        }
        assert!(
            store.quarantined()?.is_empty(),
            "{:?}",
            store.quarantined()?
        );
    }
    assert!(
        taken.iter().any(|(_, id)| announced.contains(id)),
        "no announcement was taken: the test tests too little"
    );
    // Everything expires within 2 s: the reaper empties the store.
    {
        let store = MessageStore::open(dir.store_path())?;
        std::thread::sleep(Duration::from_secs(2));
        eventually("everything reaped", || {
            (0..400_u64).all(|user| !store.may_have_messages(user))
                && store.stats().is_ok_and(|stats| stats.bulk_records == 0)
        });
        // One more round for entries whose record went with a drain.
        std::thread::sleep(Duration::from_millis(1_500));
    }
    let left = left(&dir);
    assert_eq!(left, NOTHING);
    Ok(())
}
