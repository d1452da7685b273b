//! Replace keys (issue 12), on every engine: within one user's queue, a
//! newer message with the same key replaces the queued one (only the new
//! text is delivered, in the new send's place); keys are per user and
//! compared exactly; concurrent sends with one key leave one message; bulk
//! sends and announcements with a key replace each recipient's own older
//! copy; once delivered, a key is free again; what a lease does (see
//! `Draft::replace_key`); and a replaced message stays replaced when its
//! replacement expires.

mod common;

use std::collections::HashSet;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use async_messages::{Level, ManualClock, MessageId, MessageStore, Result, UserId};
use common::clock::{manual_clock, send_sentinel, wait_for_reaper};
use common::engines::{Engine, Fixture, fast};
use common::texts;

const HOUR: Duration = Duration::from_secs(3600);
const SLACK: Duration = Duration::from_secs(1);

/// More recipients than a send to a few users: one bulk record.
const MANY: u64 = 300;

/// Sends `text` with `key` to `user`; returns its id.
fn keyed(
    store: &MessageStore,
    user: impl Into<UserId>,
    key: &str,
    text: &str,
) -> Result<MessageId> {
    Ok(store
        .compose(text, Level::Info)
        .replace_key(key)
        .to_user(user)?
        .expect("stored"))
}

fn ids(messages: &[async_messages::Message]) -> Vec<MessageId> {
    messages.iter().map(|m| m.id()).collect()
}

fn open_with_clock(engine: Engine, clock: &ManualClock) -> Result<Fixture> {
    let clock = clock.clone();
    engine.open_with(move |builder| fast(builder).clock(clock))
}

/// "3 new comments" becomes "4 new comments": the older message is gone
/// (not peeked, counted or delivered) and the newer one is queued at the
/// end, under its own id, with its key.
fn a_newer_message_with_the_same_key_replaces_the_queued_one(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    keyed(&store, 1_u64, "comments", "3 new comments")?;
    let other = store.info(1_u64, "other")?.expect("stored");
    let newer = keyed(&store, 1_u64, "comments", "4 new comments")?;
    let peeked = store.peek(1_u64)?;
    assert_eq!(texts(&peeked), ["other", "4 new comments"]);
    assert_eq!(ids(&peeked), [other, newer]);
    assert_eq!(peeked[1].replace_key(), Some("comments"));
    assert_eq!(peeked[0].replace_key(), None);
    assert_eq!(store.count(1_u64)?, 2);
    assert_eq!(store.stats()?.messages, 2);
    let lease = store.lease_messages(1_u64)?;
    assert_eq!(texts(lease.messages()), ["other", "4 new comments"]);
    lease.release();

    keyed(&store, 1_u64, "comments", "5 new comments")?;
    keyed(&store, 1_u64, "comments", "6 new comments")?;
    let got = store.get_messages(1_u64)?;
    assert_eq!(texts(&got), ["other", "6 new comments"]);
    assert!(store.get_messages(1_u64)?.is_empty(), "nothing left behind");
    assert!(store.peek(1_u64)?.is_empty());
    Ok(())
}

/// A key is per user: the same key for another user (an integer id and
/// the string id "1" are two users) replaces nothing there.
fn keys_are_per_user(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    keyed(&store, 1_u64, "report", "for 1, old")?;
    keyed(&store, 2_u64, "report", "for 2")?;
    keyed(&store, "1", "report", "for \"1\"")?;
    keyed(&store, 1_u64, "report", "for 1, new")?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["for 1, new"]);
    assert_eq!(texts(&store.get_messages(2_u64)?), ["for 2"]);
    assert_eq!(texts(&store.get_messages("1")?), ["for \"1\""]);
    Ok(())
}

/// Different keys do not interact, keys are compared exactly (no prefix,
/// case or whitespace matching), and a keyed message does not replace an
/// unkeyed one with the same text.
fn different_keys_do_not_interact(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    keyed(&store, 1_u64, "a", "a1")?;
    keyed(&store, 1_u64, "b", "b1")?;
    store.info(1_u64, "same text")?;
    keyed(&store, 1_u64, "report:4", "report 4")?;
    keyed(&store, 1_u64, "report:42", "report 42")?;
    keyed(&store, 1_u64, "A", "A1")?;
    keyed(&store, 1_u64, "a ", "a space")?;
    keyed(&store, 1_u64, "same", "same text")?;
    keyed(&store, 1_u64, "a", "a2")?;
    assert_eq!(
        texts(&store.get_messages(1_u64)?),
        [
            "b1",
            "same text",
            "report 4",
            "report 42",
            "A1",
            "a space",
            "same text",
            "a2"
        ]
    );
    Ok(())
}

/// Many threads sending with one key to one user (some through sends to a
/// few users, some through bulk records): exactly one keyed message is
/// left, the last one sent (the highest id), and every unkeyed message
/// sent beside them is kept. Several rounds.
fn concurrent_sends_with_one_key_leave_one_message(engine: Engine) -> Result<()> {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 20;
    let store = engine.open_fast()?;
    for round in 0..3 {
        let key = format!("round {round}");
        let start = Barrier::new(THREADS as usize);
        let sent: Vec<(u64, u64, MessageId)> = thread::scope(|scope| {
            let threads: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (store, key, start) = (&store, &key, &start);
                    scope.spawn(move || -> Result<Vec<(u64, u64, MessageId)>> {
                        start.wait();
                        let mut sent = Vec::new();
                        for i in 0..PER_THREAD {
                            let draft = store
                                .compose(format!("{t}:{i}"), Level::Info)
                                .replace_key(key.as_str());
                            let id = match i % 10 {
                                3 => draft.to_users([1_u64, 2])?.id(),
                                7 => draft.to_users(0..MANY)?.id(),
                                _ => draft.to_user(1_u64)?,
                            };
                            sent.push((t, i, id.expect("stored")));
                            if i % 4 == 0 {
                                store.info(1_u64, format!("plain {t}:{i}"))?;
                            }
                        }
                        Ok(sent)
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("sender panicked"))
                .collect::<Result<Vec<_>>>()
                .map(|all| all.into_iter().flatten().collect())
        })?;
        let last = sent.iter().map(|(_, _, id)| *id).max().expect("sends");
        let peeked = store.peek(1_u64)?;
        let keyed: Vec<_> = peeked
            .iter()
            .filter(|m| m.replace_key() == Some(key.as_str()))
            .collect();
        assert_eq!(keyed.len(), 1, "round {round}: {:?}", texts(&peeked));
        assert_eq!(keyed[0].id(), last, "round {round}: the last send stays");
        let plain = peeked.iter().filter(|m| m.replace_key().is_none()).count();
        assert_eq!(
            plain as u64,
            THREADS * PER_THREAD.div_ceil(4),
            "round {round}"
        );
        assert_eq!(store.count(1_u64)?, peeked.len());
        let drained = store.get_messages(1_u64)?;
        assert_eq!(drained, peeked, "round {round}");
    }
    Ok(())
}

/// Keyed sends from several threads while one thread drains the user.
/// Each call is stamped with a shared counter when it is called and when
/// it returns, so that "sent before" means what it says whatever ids the
/// engine hands out to overlapping sends. Then: each drain returns at most
/// one message with the key; none comes twice; no drain delivers a message
/// that a newer one had replaced (one whose send was called after the
/// older one's returned, and returned before the drain was called); and a
/// send made once all others have returned is delivered, alone.
fn concurrent_keyed_sends_and_drains(engine: Engine) -> Result<()> {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 60;
    /// A call's stamps: when it was called and when it returned.
    type Stamps = (u64, u64);
    let store = engine.open_fast()?;
    let done = AtomicBool::new(false);
    let counter = AtomicU64::new(0);
    let stamp = || counter.fetch_add(1, Ordering::SeqCst);
    let (sent, drains) = thread::scope(|scope| -> Result<_> {
        let drainer = {
            let (store, done, stamp) = (&store, &done, &stamp);
            scope.spawn(move || -> Result<Vec<(Stamps, Vec<MessageId>)>> {
                let mut drains = Vec::new();
                loop {
                    let finished = done.load(Ordering::Acquire);
                    let called = stamp();
                    let got = store.get_messages(1_u64)?;
                    let returned = stamp();
                    if !got.is_empty() {
                        drains.push(((called, returned), ids(&got)));
                    }
                    if finished {
                        return Ok(drains);
                    }
                }
            })
        };
        let senders: Vec<_> = (0..THREADS)
            .map(|t| {
                let (store, stamp) = (&store, &stamp);
                scope.spawn(move || -> Result<Vec<(MessageId, Stamps)>> {
                    (0..PER_THREAD)
                        .map(|i| {
                            let called = stamp();
                            let id = keyed(store, 1_u64, "k", &format!("{t}:{i}"))?;
                            Ok((id, (called, stamp())))
                        })
                        .collect()
                })
            })
            .collect();
        let mut sent = std::collections::HashMap::new();
        for sender in senders {
            sent.extend(sender.join().expect("sender panicked")?);
        }
        done.store(true, Ordering::Release);
        let drains = drainer.join().expect("drainer panicked")?;
        Ok((sent, drains))
    })?;
    let mut seen = HashSet::new();
    for ((called, _), drain) in &drains {
        assert_eq!(drain.len(), 1, "one keyed message per drain: {drains:?}");
        let id = drain[0];
        assert!(seen.insert(id), "{id:?} delivered twice: {drains:?}");
        let (_, old_returned) = sent[&id];
        let newer = sent.iter().find(|(_, (new_called, new_returned))| {
            *new_called > old_returned && new_returned < called
        });
        assert!(
            newer.is_none(),
            "{id:?} (sent {:?}) was delivered by a drain called at {called}, after {newer:?} had replaced it",
            sent[&id]
        );
    }
    let last = keyed(&store, 1_u64, "k", "last")?;
    assert_eq!(ids(&store.get_messages(1_u64)?), [last]);
    assert!(store.peek(1_u64)?.is_empty());
    Ok(())
}

/// A send to a few users with a key replaces each recipient's own older
/// copy, whatever sent it; a user outside the send keeps theirs.
fn a_send_to_a_few_users_with_a_key_replaces_each_ones_copy(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    keyed(&store, 1_u64, "k", "old for 1")?;
    store
        .compose("old for 2 and 4", Level::Info)
        .replace_key("k")
        .to_users([2_u64, 4])?;
    store.info(3_u64, "unkeyed for 3")?;
    let sent = store
        .compose("new", Level::Info)
        .replace_key("k")
        .to_users([1_u64, 2, 3])?;
    assert_eq!(sent.recipients(), 3);
    assert_eq!(texts(&store.get_messages(1_u64)?), ["new"]);
    assert_eq!(texts(&store.get_messages(2_u64)?), ["new"]);
    assert_eq!(texts(&store.get_messages(3_u64)?), ["unkeyed for 3", "new"]);
    assert_eq!(texts(&store.get_messages(4_u64)?), ["old for 2 and 4"]);
    Ok(())
}

/// A bulk send (one record, over 256 recipients) with a key replaces each
/// recipient's older copy: their own message, a copy of a send to a few,
/// a copy of an older bulk record. Recipients of the older bulk record
/// outside the newer one keep it; and a keyed send to one user replaces
/// only that user's copy of a bulk record.
fn a_bulk_send_with_a_key_replaces_each_recipients_copy(engine: Engine) -> Result<()> {
    let store = engine.open_fast()?;
    store
        .compose("older bulk", Level::Info)
        .replace_key("k")
        .to_users(0..MANY + 100)?;
    keyed(&store, 10_u64, "k", "own for 10")?;
    store
        .compose("few for 11 and 12", Level::Info)
        .replace_key("k")
        .to_users([11_u64, 12])?;
    store.info(13_u64, "unkeyed for 13")?;
    let sent = store
        .compose("newer bulk", Level::Info)
        .replace_key("k")
        .to_users(0..MANY)?;
    assert_eq!(sent.recipients(), MANY);
    keyed(&store, 5_u64, "k", "own for 5")?;
    for user in 0..MANY + 100 {
        let want: &[&str] = match user {
            5 => &["own for 5"],
            13 => &["unkeyed for 13", "newer bulk"],
            u if u >= MANY => &["older bulk"],
            _ => &["newer bulk"],
        };
        assert_eq!(texts(&store.peek(user)?), want, "peek of user {user}");
        assert_eq!(store.count(user)?, want.len(), "count of user {user}");
    }
    for user in 0..MANY + 100 {
        let want: &[&str] = match user {
            5 => &["own for 5"],
            13 => &["unkeyed for 13", "newer bulk"],
            u if u >= MANY => &["older bulk"],
            _ => &["newer bulk"],
        };
        assert_eq!(texts(&store.get_messages(user)?), want, "user {user}");
    }
    assert_eq!(store.stats()?.messages, 0);
    Ok(())
}

/// An announcement with a key replaces each user's own older copy; a
/// newer announcement with the key replaces an older one for users who
/// had not read it; a keyed send to one user replaces only that user's
/// copy of an announcement.
fn an_announcement_with_a_key_replaces_each_users_copy(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    keyed(&store, 1_u64, "status", "own, old")?;
    store
        .compose("bulk, old", Level::Info)
        .replace_key("status")
        .to_users(0..MANY)?;
    store
        .compose("v1", Level::Warning)
        .replace_key("status")
        .to_everyone()?;
    assert_eq!(texts(&store.peek(1_u64)?), ["v1"]);
    assert_eq!(texts(&store.get_messages(2_u64)?), ["v1"], "read before v2");
    store
        .compose("v2", Level::Warning)
        .replace_key("status")
        .to_everyone()?;
    keyed(&store, 3_u64, "status", "own for 3")?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["v2"]);
    assert_eq!(texts(&store.get_messages(2_u64)?), ["v2"]);
    assert_eq!(texts(&store.get_messages(3_u64)?), ["own for 3"]);
    assert_eq!(texts(&store.get_messages(4_u64)?), ["v2"]);
    assert_eq!(texts(&store.get_messages("newcomer")?), ["v2"]);
    for user in [1_u64, 2, 3, 4] {
        assert!(store.get_messages(user)?.is_empty(), "user {user}");
    }
    Ok(())
}

/// Once a keyed message is delivered (drained, or leased and committed),
/// its key is free: the next send with it is delivered. The same for a
/// bulk copy and an announcement, which do not come back either.
fn once_delivered_a_key_is_free_again(engine: Engine) -> Result<()> {
    let store = engine.open_fast()?;
    keyed(&store, 1_u64, "k", "first")?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["first"]);
    keyed(&store, 1_u64, "k", "second")?;
    let lease = store.lease_messages(1_u64)?;
    assert_eq!(texts(lease.messages()), ["second"]);
    assert_eq!(texts(&lease.commit()?), ["second"]);
    keyed(&store, 1_u64, "k", "third")?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["third"]);

    store
        .compose("bulk", Level::Info)
        .replace_key("k")
        .to_users(0..MANY)?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["bulk"]);
    keyed(&store, 1_u64, "k", "after bulk")?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["after bulk"]);

    store
        .compose("announcement", Level::Info)
        .replace_key("k")
        .to_everyone()?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["announcement"]);
    keyed(&store, 1_u64, "k", "after announcement")?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["after announcement"]);
    assert!(store.get_messages(1_u64)?.is_empty());
    Ok(())
}

/// A leased keyed message is not replaced by a send with its key: the new
/// one is queued beside it. A commit: the old one was shown, the newest
/// follows on the next read.
fn a_committed_lease_shows_the_old_then_the_newest(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    keyed(&store, 1_u64, "k", "old")?;
    let lease = store.lease_messages(1_u64)?;
    assert_eq!(texts(lease.messages()), ["old"]);
    keyed(&store, 1_u64, "k", "new")?;
    keyed(&store, 1_u64, "k", "newest")?;
    let peeked = texts(&store.peek(1_u64)?);
    assert_eq!(
        peeked.last().map(String::as_str),
        Some("newest"),
        "{peeked:?}"
    );
    assert!(!peeked.contains(&"new".to_owned()), "{peeked:?}");
    assert_eq!(texts(&lease.commit()?), ["old"]);
    assert_eq!(texts(&store.get_messages(1_u64)?), ["newest"]);
    assert!(store.get_messages(1_u64)?.is_empty());
    Ok(())
}

/// A release (or a dropped lease) puts the old message back, where it is
/// dropped in favour of the newer one still queued: only the newer is
/// delivered, whether the old or the new came through a bulk record.
fn a_released_lease_drops_the_old_in_favour_of_the_newer(engine: Engine) -> Result<()> {
    let store = engine.open_fast()?;
    // Own, replaced by own: released, and dropped.
    keyed(&store, 1_u64, "k", "old")?;
    keyed(&store, 2_u64, "k", "old")?;
    let released = store.lease_messages(1_u64)?;
    let dropped = store.lease_messages(2_u64)?;
    keyed(&store, 1_u64, "k", "new")?;
    keyed(&store, 2_u64, "k", "new")?;
    released.release();
    drop(dropped);
    for user in [1_u64, 2] {
        assert_eq!(texts(&store.peek(user)?), ["new"], "user {user}");
        assert_eq!(store.count(user)?, 1, "user {user}");
        assert_eq!(texts(&store.get_messages(user)?), ["new"], "user {user}");
        assert!(store.get_messages(user)?.is_empty(), "user {user}");
    }
    // A bulk copy replaced by an own message, and the other way round.
    store
        .compose("old bulk", Level::Info)
        .replace_key("b")
        .to_users(0..MANY)?;
    keyed(&store, 4_u64, "b", "old own")?;
    let lease3 = store.lease_messages(3_u64)?;
    let lease4 = store.lease_messages(4_u64)?;
    assert_eq!(texts(lease3.messages()), ["old bulk"]);
    assert_eq!(texts(lease4.messages()), ["old own"]);
    keyed(&store, 3_u64, "b", "new own")?;
    store
        .compose("new bulk", Level::Info)
        .replace_key("b")
        .to_users(4..MANY)?;
    lease3.release();
    lease4.release();
    assert_eq!(texts(&store.get_messages(3_u64)?), ["new own"]);
    assert_eq!(texts(&store.get_messages(4_u64)?), ["new bulk"]);
    assert_eq!(texts(&store.get_messages(5_u64)?), ["new bulk"]);
    assert_eq!(texts(&store.get_messages(0_u64)?), ["old bulk"]);
    Ok(())
}

/// The newer message was delivered while the old one was leased: there is
/// no newer one queued any more, so a released old one comes back and is
/// delivered (once).
fn a_released_old_message_comes_back_once_the_newer_is_delivered(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    keyed(&store, 1_u64, "k", "old")?;
    let lease = store.lease_messages(1_u64)?;
    keyed(&store, 1_u64, "k", "new")?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["new"]);
    lease.release();
    assert_eq!(texts(&store.get_messages(1_u64)?), ["old"]);
    assert!(store.get_messages(1_u64)?.is_empty());
    Ok(())
}

/// An announcement with a key replaces a user's queued message with that
/// key when it is sent; the replaced message does not come back once the
/// announcement expires, also for a user who reads only after that.
fn an_announcement_replaces_even_for_users_who_read_after_it_expired(engine: Engine) -> Result<()> {
    let clock = manual_clock();
    let store = open_with_clock(engine, &clock)?;
    keyed(&store, 1_u64, "maintenance", "maintenance on Monday")?;
    keyed(&store, 2_u64, "maintenance", "maintenance on Monday")?;
    store
        .compose("maintenance moved to Tuesday", Level::Warning)
        .replace_key("maintenance")
        .expires_after(HOUR)
        .to_everyone()?;
    assert_eq!(
        texts(&store.get_messages(1_u64)?),
        ["maintenance moved to Tuesday"]
    );
    clock.advance(HOUR + SLACK);
    assert!(
        store.peek(2_u64)?.is_empty(),
        "replaced: {:?}",
        texts(&store.peek(2_u64)?)
    );
    assert!(store.get_messages(2_u64)?.is_empty());
    assert!(store.get_messages(1_u64)?.is_empty());
    Ok(())
}

/// A replaced message stays replaced when its replacement expires and the
/// reaper removes that: an own message replaced by an own one, a bulk
/// copy replaced by an own message or by a newer bulk send, an
/// announcement replaced by an own message or by a bulk send, and an old
/// message released after the newer one was queued.
fn a_replaced_message_stays_gone_after_its_replacement_expires(engine: Engine) -> Result<()> {
    let clock = manual_clock();
    let store = open_with_clock(engine, &clock)?;
    send_sentinel(&store, HOUR)?;
    let expiring = |user: UserId| -> Result<()> {
        store
            .compose("own, new", Level::Info)
            .replace_key("k")
            .expires_after(HOUR)
            .to_user(user)?;
        Ok(())
    };
    let only_announced = UserId::from("only announced");
    store
        .compose("announcement, old", Level::Info)
        .replace_key("k")
        .to_everyone()?;
    store
        .compose("bulk, old", Level::Info)
        .replace_key("k")
        .to_users(0..MANY)?;
    // 1: own by own; 2: a bulk copy by own; "only announced": an
    // announcement by own.
    keyed(&store, 1_u64, "k", "own, old")?;
    expiring(1_u64.into())?;
    expiring(2_u64.into())?;
    expiring(only_announced.clone())?;
    // 10: a bulk copy, and MANY: an announcement, by a newer bulk send.
    store
        .compose("bulk, new", Level::Info)
        .replace_key("k")
        .expires_after(HOUR)
        .to_users(10..=MANY)?;
    // 5: released after the newer one was queued.
    let lease = store.lease_messages(5_u64)?;
    assert_eq!(texts(lease.messages()), ["bulk, old"]);
    expiring(5_u64.into())?;
    lease.release();
    let replaced: Vec<UserId> = vec![
        1_u64.into(),
        2_u64.into(),
        only_announced,
        10_u64.into(),
        MANY.into(),
        5_u64.into(),
    ];
    for user in &replaced {
        let want = match user {
            UserId::Int(10) | UserId::Int(MANY) => "bulk, new",
            _ => "own, new",
        };
        assert_eq!(texts(&store.peek(user)?), [want], "user {user:?}");
    }

    clock.advance(HOUR + SLACK);
    for user in &replaced {
        assert!(
            store.peek(user)?.is_empty(),
            "user {user:?}, before reaping"
        );
    }
    wait_for_reaper(&store)?;
    let mut back = Vec::new();
    for user in &replaced {
        let peeked = texts(&store.peek(user)?);
        let drained = texts(&store.get_messages(user)?);
        if !peeked.is_empty() || !drained.is_empty() {
            back.push(format!("{user:?}: peek {peeked:?}, drain {drained:?}"));
        }
    }
    assert!(back.is_empty(), "back after reaping: {back:#?}");
    // Users outside the newer sends still have the older ones.
    assert_eq!(texts(&store.get_messages(0_u64)?), ["bulk, old"]);
    assert_eq!(
        texts(&store.get_messages("newcomer")?),
        ["announcement, old"]
    );
    Ok(())
}

engine_tests! {
    a_newer_message_with_the_same_key_replaces_the_queued_one,
    keys_are_per_user,
    different_keys_do_not_interact,
    concurrent_sends_with_one_key_leave_one_message,
    concurrent_keyed_sends_and_drains,
    a_send_to_a_few_users_with_a_key_replaces_each_ones_copy,
    a_bulk_send_with_a_key_replaces_each_recipients_copy,
    an_announcement_with_a_key_replaces_each_users_copy,
    once_delivered_a_key_is_free_again,
    a_committed_lease_shows_the_old_then_the_newest,
    a_released_lease_drops_the_old_in_favour_of_the_newer,
    a_released_old_message_comes_back_once_the_newer_is_delivered,
    an_announcement_replaces_even_for_users_who_read_after_it_expired,
    a_replaced_message_stays_gone_after_its_replacement_expires,
}
