//! Expiry (issue 12), on every engine, with a `ManualClock` instead of
//! sleeps: an expired message is never delivered, peeked, counted or leased
//! (to within 1 s: each test looks 1 s before and 1 s after the expiry
//! time); `Builder::default_expiry` applies to every send without an
//! expiry of its own; bulk sends and announcements expire as a whole; a
//! lease keeps what it took; the background reaper leaves nothing behind;
//! and senders and drainers racing around the expiry times never deliver
//! an expired message nor lose an unexpired one.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, SystemTime};

use async_messages::{Builder, Clock, Level, ManualClock, MessageStore, Result, UserId};
use common::clock::{DEADLINE, manual_clock, ms, poll, send_sentinel, wait_for_reaper};
use common::engines::{Engine, Fixture, fast};
use common::{Rng, seed_from_env, texts};

const HOUR: Duration = Duration::from_secs(3600);

/// The promise holds to within this.
const SLACK: Duration = Duration::from_secs(1);

/// A fresh store on `engine` reading `clock`, with fast durability on sled.
fn open(engine: Engine, clock: &ManualClock) -> Result<Fixture> {
    open_with(engine, clock, |builder| builder)
}

fn open_with(
    engine: Engine,
    clock: &ManualClock,
    configure: impl FnOnce(Builder) -> Builder,
) -> Result<Fixture> {
    let clock = clock.clone();
    engine.open_with(move |builder| configure(fast(builder).clock(clock)))
}

/// What a user sees right now through every read: `peek`, `count`, and a
/// lease (released again), which must all agree with `want`.
fn assert_sees(store: &MessageStore, user: impl Into<UserId>, want: &[&str]) -> Result<()> {
    let user = user.into();
    assert_eq!(texts(&store.peek(&user)?), want, "peek({user:?})");
    assert_eq!(store.count(&user)?, want.len(), "count({user:?})");
    let lease = store.lease_messages(&user)?;
    assert_eq!(texts(lease.messages()), want, "lease_messages({user:?})");
    lease.release();
    Ok(())
}

/// An expired message is not delivered, peeked, counted (`count`,
/// `stats`) or leased, from 1 s after its expiry time; until 1 s before,
/// it is all of those. Its `expires_at()` is its send time plus the
/// duration, exactly.
fn an_expired_message_is_never_delivered_peeked_counted_or_leased(engine: Engine) -> Result<()> {
    let clock = manual_clock();
    let store = open(engine, &clock)?;
    let sent_at = clock.now();
    store.info(1_u64, "before")?;
    store
        .compose("expires", Level::Warning)
        .expires_after(HOUR)
        .to_user(1_u64)?;
    store.info(1_u64, "after")?;
    // User 2 has only a message that expires; user 3 takes theirs in time.
    store
        .compose("expires too", Level::Info)
        .expires_after(HOUR)
        .to_user(2_u64)?;
    store
        .compose("taken in time", Level::Info)
        .expires_after(HOUR)
        .to_user(3_u64)?;

    let peeked = store.peek(1_u64)?;
    assert_eq!(texts(&peeked), ["before", "expires", "after"]);
    assert_eq!(peeked[1].sent_at(), sent_at);
    assert_eq!(peeked[1].expires_at(), Some(sent_at + HOUR));
    assert_eq!(peeked[1].level(), Level::Warning);
    assert_eq!(peeked[0].expires_at(), None, "no expiry unless asked for");
    assert_eq!(peeked[2].expires_at(), None);

    clock.advance(HOUR - SLACK);
    assert_sees(&store, 1_u64, &["before", "expires", "after"])?;
    assert_sees(&store, 2_u64, &["expires too"])?;
    let stats = store.stats()?;
    assert_eq!((stats.users, stats.messages), (3, 5), "{stats:?}");
    assert_eq!(texts(&store.get_messages(3_u64)?), ["taken in time"]);

    clock.advance(2 * SLACK);
    assert_sees(&store, 1_u64, &["before", "after"])?;
    assert_sees(&store, 2_u64, &[])?;
    assert_sees(&store, 3_u64, &[])?;
    let stats = store.stats()?;
    assert_eq!(
        (stats.users, stats.messages),
        (1, 2),
        "an expired message is not counted, nor is a user left with only expired ones: {stats:?}"
    );
    assert_eq!(texts(&store.get_messages(1_u64)?), ["before", "after"]);
    assert!(store.get_messages(2_u64)?.is_empty());

    // The drains removed the expired messages with the rest: a clock set
    // back (a wall-clock jump) does not bring them back.
    clock.set(sent_at);
    assert!(store.peek(1_u64)?.is_empty(), "{:?}", store.peek(1_u64)?);
    assert!(store.peek(2_u64)?.is_empty(), "{:?}", store.peek(2_u64)?);
    Ok(())
}

/// Without `default_expiry` (the default), a message waits for its user:
/// twenty years later it is still there.
fn without_an_expiry_a_message_waits_for_its_user(engine: Engine) -> Result<()> {
    let clock = manual_clock();
    let store = open(engine, &clock)?;
    store.info(1_u64, "plain")?;
    store.compose("draft", Level::Info).to_user(1_u64)?;
    store.message_users(0..300_u64, "bulk", Level::Info)?;
    store.compose("announcement", Level::Info).to_everyone()?;
    let all = ["plain", "draft", "bulk", "announcement"];
    assert!(store.peek(1_u64)?.iter().all(|m| m.expires_at().is_none()));
    clock.advance(2 * MessageStore::MAX_EXPIRY);
    assert_sees(&store, 1_u64, &all)?;
    assert_eq!(texts(&store.get_messages(1_u64)?), all);
    assert_eq!(
        texts(&store.get_messages(299_u64)?),
        ["bulk", "announcement"]
    );
    Ok(())
}

/// `Builder::default_expiry` applies to plain sends (one user, a few, many)
/// and to drafts and announcements without an expiry of their own; a
/// draft's own `expires_after` and `never_expires()` override it.
fn default_expiry_applies_to_every_send_without_its_own(engine: Engine) -> Result<()> {
    let clock = manual_clock();
    let store = open_with(engine, &clock, |builder| builder.default_expiry(Some(HOUR)))?;
    let t0 = clock.now();
    store.info(1_u64, "plain")?;
    store.message_users([1_u64, 2], "few", Level::Info)?;
    store.message_users(0..300_u64, "many", Level::Info)?;
    store.compose("draft", Level::Info).to_user(1_u64)?;
    store
        .compose("own", Level::Info)
        .expires_after(2 * HOUR)
        .to_user(1_u64)?;
    store
        .compose("never", Level::Info)
        .never_expires()
        .to_user(1_u64)?;
    store.compose("announcement", Level::Info).to_everyone()?;

    let peeked = store.peek(1_u64)?;
    let got: Vec<(&str, Option<SystemTime>)> =
        peeked.iter().map(|m| (m.text(), m.expires_at())).collect();
    assert_eq!(
        got,
        [
            ("plain", Some(t0 + HOUR)),
            ("few", Some(t0 + HOUR)),
            ("many", Some(t0 + HOUR)),
            ("draft", Some(t0 + HOUR)),
            ("own", Some(t0 + 2 * HOUR)),
            ("never", None),
            ("announcement", Some(t0 + HOUR)),
        ]
    );

    clock.advance(HOUR - SLACK);
    assert_sees(&store, 2_u64, &["few", "many", "announcement"])?;
    clock.advance(2 * SLACK);
    assert_sees(&store, 1_u64, &["own", "never"])?;
    assert_sees(&store, 2_u64, &[])?;
    assert_sees(&store, 299_u64, &[])?;
    assert_sees(&store, "newcomer", &[])?;
    clock.advance(HOUR);
    assert_sees(&store, 1_u64, &["never"])?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["never"]);
    Ok(())
}

/// A send to a few users and one to many (stored as one bulk record)
/// expire for every recipient at once; a recipient who took it in time
/// has it, no one gets it after.
fn bulk_sends_expire_as_a_whole(engine: Engine) -> Result<()> {
    let clock = manual_clock();
    let store = open(engine, &clock)?;
    store
        .compose("few", Level::Info)
        .expires_after(HOUR)
        .to_users([1_u64, 2, 3])?;
    let sent = store
        .compose("many", Level::Info)
        .expires_after(HOUR)
        .to_users(0..300_u64)?;
    assert_eq!(sent.recipients(), 300);
    store.info(1_u64, "kept")?;
    store.info(299_u64, "kept")?;

    clock.advance(HOUR - SLACK);
    assert_eq!(texts(&store.get_messages(2_u64)?), ["few", "many"]);
    for user in 0..300_u64 {
        let want: &[&str] = match user {
            1 => &["few", "many", "kept"],
            2 => &[],
            3 => &["few", "many"],
            299 => &["many", "kept"],
            _ => &["many"],
        };
        assert_eq!(texts(&store.peek(user)?), want, "user {user}");
    }

    clock.advance(2 * SLACK);
    assert_sees(&store, 3_u64, &[])?;
    for user in 0..300_u64 {
        let want: &[&str] = if user == 1 || user == 299 {
            &["kept"]
        } else {
            &[]
        };
        assert_eq!(texts(&store.get_messages(user)?), want, "user {user}");
    }
    assert_eq!(store.stats()?.messages, 0);
    Ok(())
}

/// An announcement expires for everyone at once: a user who took it in
/// time had it; known and never-seen users alike get nothing after.
fn an_announcement_expires_as_a_whole(engine: Engine) -> Result<()> {
    let clock = manual_clock();
    let store = open(engine, &clock)?;
    store.info(2_u64, "known")?;
    store
        .compose("maintenance tonight", Level::Warning)
        .expires_after(HOUR)
        .to_everyone()?;
    clock.advance(HOUR - SLACK);
    assert_eq!(texts(&store.get_messages(1_u64)?), ["maintenance tonight"]);
    assert_sees(&store, 2_u64, &["known", "maintenance tonight"])?;
    assert_sees(&store, "early", &["maintenance tonight"])?;
    clock.advance(2 * SLACK);
    assert_sees(&store, 2_u64, &["known"])?;
    assert_sees(&store, "early", &[])?;
    assert_sees(&store, "newcomer", &[])?;
    assert_eq!(texts(&store.get_messages(2_u64)?), ["known"]);
    assert!(store.get_messages("early")?.is_empty());
    assert!(store.get_messages("newcomer")?.is_empty());
    assert!(store.get_messages(1_u64)?.is_empty());
    Ok(())
}

/// A lease taken before expiry keeps what it took, even once the messages
/// expire and the reaper has run: its commit returns them as leased (they
/// were shown) and removes them; a release or a drop puts back only the
/// unexpired ones. While leased, an expired message is not counted.
fn a_lease_taken_before_expiry_keeps_its_messages(engine: Engine) -> Result<()> {
    let clock = manual_clock();
    let store = open(engine, &clock)?;
    send_sentinel(&store, HOUR)?;
    for user in 1..=3_u64 {
        store.info(user, "kept")?;
        store
            .compose("expires", Level::Info)
            .expires_after(HOUR)
            .to_user(user)?;
    }
    clock.advance(HOUR - SLACK);
    let committed = store.lease_messages(1_u64)?;
    let released = store.lease_messages(2_u64)?;
    let dropped = store.lease_messages(3_u64)?;
    for lease in [&committed, &released, &dropped] {
        assert_eq!(texts(lease.messages()), ["kept", "expires"]);
    }
    clock.advance(2 * SLACK);
    wait_for_reaper(&store)?;
    assert_eq!(
        texts(&store.peek(1_u64)?),
        ["kept"],
        "leased messages are counted, expired ones are not"
    );
    assert_eq!(store.count(1_u64)?, 1);

    assert_eq!(texts(&committed.commit()?), ["kept", "expires"]);
    assert!(store.get_messages(1_u64)?.is_empty());
    assert!(store.peek(1_u64)?.is_empty());

    released.release();
    drop(dropped);
    for user in [2_u64, 3] {
        assert_sees(&store, user, &["kept"])?;
        assert_eq!(texts(&store.get_messages(user)?), ["kept"], "user {user}");
    }
    Ok(())
}

/// Once everything has expired, the background reaper removes it without
/// anyone reading: `stats()` shows no users, messages or bulk records, and
/// `users()` lists no one (an engine that still lists the recipients of a
/// reaped record still keeps something of it), within a generous
/// deadline. Covers own
/// records, sends to a few users, bulk records, announcements (read by
/// some users, not by others), keyed messages, and leases that were
/// released or committed.
fn the_reaper_leaves_nothing_behind(engine: Engine) -> Result<()> {
    let clock = manual_clock();
    let store = open(engine, &clock)?;
    for user in 0..20_u64 {
        store
            .compose(format!("own {user}"), Level::Info)
            .expires_after(HOUR)
            .to_user(user)?;
    }
    store
        .compose("keyed", Level::Info)
        .replace_key("k")
        .expires_after(HOUR)
        .to_user("keyed user")?;
    store
        .compose("few", Level::Info)
        .expires_after(HOUR)
        .to_users(0..5_u64)?;
    store
        .compose("many", Level::Info)
        .expires_after(HOUR)
        .to_users(0..300_u64)?;
    store
        .compose("many, keyed", Level::Info)
        .replace_key("k")
        .expires_after(HOUR)
        .to_users(100..400_u64)?;
    store
        .compose("announcement", Level::Info)
        .expires_after(HOUR)
        .to_everyone()?;
    // Some users read before expiry, taking their copy or leaving it.
    for user in 0..10_u64 {
        store.peek(user)?;
    }
    store.peek("reader")?;
    assert_eq!(
        texts(&store.get_messages(0_u64)?),
        ["own 0", "few", "many", "announcement"]
    );
    store.lease_messages(1_u64)?.release();
    store.lease_messages(2_u64)?.commit()?;
    let before = store.stats()?;
    assert!(before.messages > 300, "{before:?}");

    clock.advance(HOUR + SLACK);
    let mut left = (before, Vec::new());
    let reaped = poll(|| {
        left = (store.stats()?, store.users()?);
        let (stats, users) = &left;
        Ok(stats.users == 0 && stats.messages == 0 && stats.bulk_records == 0 && users.is_empty())
    })?;
    assert!(
        reaped,
        "{DEADLINE:?} after everything expired, the store still has {:?}, users {:?}",
        left.0, left.1
    );
    assert_eq!(store.stats()?.quarantined, 0);
    Ok(())
}

/// sled: after everything expires, the store's size on disk returns to
/// within 4 MiB of an empty store's (one written to once), without anyone
/// calling anything (within a generous deadline).
///
/// With messages of 4 KiB. Larger ones (over about 7 KiB) make sled 0.34
/// write tree pages of more than 128 KiB to separate blob files, some of
/// which it never deletes: with 60 KiB messages 11–14 MB stayed (README,
/// "Expiry, replace keys, announcements").
fn disk_space_comes_back_after_everything_expires(engine: Engine) -> Result<()> {
    const TEXT: usize = 4 << 10;
    let clock = manual_clock();
    let store = open(engine, &clock)?;
    // An empty store that has been written to once.
    store.info(1_u64, "hello")?;
    store.get_messages(1_u64)?;
    store.flush()?;
    let empty = store.size_on_disk()?;
    let text = "x".repeat(TEXT);
    for i in 0..7000_u64 {
        store
            .compose(format!("{i} {text}"), Level::Info)
            .expires_after(HOUR)
            .to_user(i % 40)?;
    }
    store
        .compose(format!("bulk {text}"), Level::Info)
        .expires_after(HOUR)
        .to_users(0..5000_u64)?;
    store.flush()?;
    let full = store.size_on_disk()?;
    assert!(
        full > empty + (24 << 20),
        "the test should fill the disk: {empty} -> {full} bytes"
    );
    clock.advance(HOUR + SLACK);
    let mut last = full;
    let back = poll(|| {
        last = store.size_on_disk()?;
        Ok(last <= empty + (4 << 20))
    })?;
    assert!(
        back,
        "{DEADLINE:?} after everything expired, {last} bytes on disk: an empty store had {empty}, the full one {full}"
    );
    Ok(())
}

/// Senders (with random short expiries, moving the clock forward as they
/// go) and drainers (`get_messages`, and leases they commit) racing on a
/// few users: no message is delivered at or after its expiry time (the
/// seam's rule, judged against the clock read just before the drain was
/// called), none is delivered twice, and every message still unexpired
/// when the race ends is delivered by the final drain.
fn racing_senders_and_drainers_respect_expiry(engine: Engine) -> Result<()> {
    const SENDERS: u64 = 3;
    const DRAINERS: usize = 2;
    const PER_SENDER: u64 = 300;
    const USERS: u64 = 4;
    let seed = seed_from_env("ASYNC_MESSAGES_SEED");
    println!("seed {seed} (set ASYNC_MESSAGES_SEED to replay)");
    let clock = manual_clock();
    let store = open(engine, &clock)?;
    let now = || ms(clock.now());

    /// What a sender knows of a message: its user, its expiry duration in
    /// ms, and the clock before and after the send.
    #[derive(Debug, Clone, Copy)]
    struct Sent {
        user: u64,
        expiry: u64,
        before: u64,
        after: u64,
    }
    /// A message to one user: sender, index, user.
    type Key = (u64, u64, u64);
    /// One delivery: the message, its expiry time, the clock before the
    /// read that returned it.
    type Delivered = (Key, u64, u64);

    let done = AtomicBool::new(false);
    let (sent, delivered) = thread::scope(|scope| -> Result<_> {
        let drainers: Vec<_> = (0..DRAINERS)
            .map(|d| {
                let (done, store, now) = (&done, &store, &now);
                scope.spawn(move || -> Result<Vec<Delivered>> {
                    let mut got = Vec::new();
                    let mut turn = d as u64;
                    while !done.load(Ordering::Acquire) {
                        turn += 1;
                        let user = turn % USERS;
                        let before = now();
                        let messages = if turn.is_multiple_of(3) {
                            store.lease_messages(user)?.commit()?
                        } else {
                            store.get_messages(user)?
                        };
                        for m in messages {
                            let at = m.expires_at().map_or(u64::MAX, ms);
                            got.push((parse(m.text(), user), at, before));
                        }
                    }
                    Ok(got)
                })
            })
            .collect();
        let senders: Vec<_> = (0..SENDERS)
            .map(|s| {
                let (store, clock, now) = (&store, &clock, &now);
                scope.spawn(move || -> Result<Vec<(Key, Sent)>> {
                    let mut rng = Rng::new(seed.wrapping_add(s));
                    let mut sent = Vec::new();
                    for i in 0..PER_SENDER {
                        clock.advance(Duration::from_millis(rng.below(31)));
                        let user = rng.below(USERS);
                        let expiry = 1 + rng.below(80);
                        let draft = store
                            .compose(format!("{s}:{i}"), Level::Info)
                            .expires_after(Duration::from_millis(expiry));
                        let before = now();
                        let users: Vec<u64> = if i % 50 == 49 {
                            // A bulk record (over 256 recipients).
                            draft.to_users(0..300_u64)?;
                            (0..USERS).collect()
                        } else if i % 7 == 6 {
                            let other = (user + 1) % USERS;
                            draft.to_users([user, other])?;
                            vec![user, other]
                        } else {
                            draft.to_user(user)?;
                            vec![user]
                        };
                        let after = now();
                        for user in users {
                            let at = Sent {
                                user,
                                expiry,
                                before,
                                after,
                            };
                            sent.push(((s, i, user), at));
                        }
                        thread::yield_now();
                    }
                    Ok(sent)
                })
            })
            .collect();
        let mut sent = HashMap::new();
        for sender in senders {
            sent.extend(sender.join().expect("sender panicked")?);
        }
        done.store(true, Ordering::Release);
        let mut delivered = Vec::new();
        for drainer in drainers {
            delivered.extend(drainer.join().expect("drainer panicked")?);
        }
        Ok((sent, delivered))
    })?;

    let end = now();
    let mut delivered = delivered;
    for user in 0..USERS {
        for m in store.get_messages(user)? {
            let at = m.expires_at().map_or(u64::MAX, ms);
            delivered.push((parse(m.text(), user), at, end));
        }
    }
    let mut times: HashMap<Key, usize> = HashMap::new();
    for &(message, expires_at, read_at) in &delivered {
        *times.entry(message).or_default() += 1;
        let sent = sent
            .get(&message)
            .unwrap_or_else(|| panic!("{message:?} was delivered but never sent"));
        assert!(
            (sent.before + sent.expiry..=sent.after + sent.expiry).contains(&expires_at),
            "{message:?}: expires at {expires_at}, sent {sent:?}"
        );
        assert!(
            expires_at > read_at,
            "{message:?} was delivered by a read that started at {read_at}, at or after its expiry time {expires_at}"
        );
    }
    let mut expired = 0;
    for (message, at) in &sent {
        match times.get(message) {
            Some(1) => {}
            Some(n) => panic!("{message:?} was delivered {n} times"),
            None => {
                assert!(
                    at.before + at.expiry <= end,
                    "{message:?} was lost: unexpired at the end ({end}), sent {at:?}"
                );
                expired += 1;
            }
        }
    }
    println!(
        "{} deliveries, {expired} expired undelivered, clock moved {} ms",
        delivered.len(),
        end - (sent.values().map(|s| s.before).min().unwrap_or(end))
    );
    assert!(
        expired > 0 && expired < sent.len(),
        "the race should both deliver and expire messages: {expired} of {} expired",
        sent.len()
    );
    assert!(sent.values().all(|s| s.user < USERS));
    Ok(())
}

/// `"{sender}:{index}"` and the user it was delivered to.
fn parse(text: &str, user: u64) -> (u64, u64, u64) {
    let (s, i) = text.split_once(':').expect("sender:index");
    (s.parse().expect("sender"), i.parse().expect("index"), user)
}

engine_tests! {
    an_expired_message_is_never_delivered_peeked_counted_or_leased,
    without_an_expiry_a_message_waits_for_its_user,
    default_expiry_applies_to_every_send_without_its_own,
    bulk_sends_expire_as_a_whole,
    an_announcement_expires_as_a_whole,
    a_lease_taken_before_expiry_keeps_its_messages,
    the_reaper_leaves_nothing_behind,
    disk_space_comes_back_after_everything_expires: Sled,
    racing_senders_and_drainers_respect_expiry,
}
