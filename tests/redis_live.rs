//! The Redis engine's own parts of issue 12: live delivery across
//! processes (pub/sub), the background reaper of expired messages, and
//! announcements kept in Redis.
//!
//! "Another process" is a second handle (its own `RedisEngine`, pool and
//! notifier) on the same server and namespace: its watchers hear of a send
//! only through Redis. Waits for background work poll with a generous
//! deadline; nothing asserts how fast it is.
#![cfg(feature = "redis")]

mod common;

use std::time::{Duration, Instant};

use async_messages::{Level, ManualClock, MessageStore};
use common::redis::RedisServer;
use common::texts;

/// How long a wake-up or the reaper may take before the test fails: far
/// above the expected (milliseconds, and one `REAP_EVERY` of 1 s).
const DEADLINE: Duration = Duration::from_secs(20);

fn open(server: &RedisServer, namespace: &str) -> MessageStore {
    MessageStore::builder()
        .redis(server.url())
        .namespace(namespace)
        .open()
        .expect("open")
}

fn open_with_clock(server: &RedisServer, namespace: &str, clock: &ManualClock) -> MessageStore {
    MessageStore::builder()
        .redis(server.url())
        .namespace(namespace)
        .clock(clock.clone())
        .open()
        .expect("open")
}

/// Polls `done` every 20 ms until it holds; panics with `what` after
/// [`DEADLINE`].
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "not within {DEADLINE:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The namespace's keys, as `redis-cli KEYS` lists them (binary user
/// prefixes shown lossily), sorted.
fn keys(server: &RedisServer, namespace: &str) -> Vec<String> {
    let listed = server.command(&["KEYS", &format!("{namespace}:*")]);
    let mut keys: Vec<String> = listed
        .lines()
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    keys.sort();
    keys
}

/// The kinds (`q`, `l`, `exp`, ...) of the namespace's keys that hold
/// messages, bulk sends or their bookkeeping; the counters and retry marks
/// (`id`, `epoch`, `sent:T`, `done:T`) are left out.
fn kinds(server: &RedisServer, namespace: &str) -> Vec<String> {
    let mut kinds: Vec<String> = keys(server, namespace)
        .iter()
        .filter_map(|key| {
            let rest = key.strip_prefix(namespace)?.strip_prefix(':')?;
            let kind = rest.split(':').next()?;
            (!["id", "epoch", "sent", "done"].contains(&kind)).then(|| kind.to_owned())
        })
        .collect();
    kinds.dedup();
    kinds
}

#[test]
fn a_send_from_another_handle_wakes_a_watcher() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let watching = open(&server, "live");
    let sending = open(&server, "live");
    let mut watch = watching.watch(7_u64).expect("watch");
    assert!(watching.get_messages(7_u64).expect("drain").is_empty());

    sending.info(7_u64, "your report is ready").expect("send");
    assert!(
        watch.wait_timeout(DEADLINE),
        "the other handle's send did not wake the watcher"
    );
    assert_eq!(
        texts(&watching.get_messages(7_u64).expect("drain")),
        ["your report is ready"]
    );

    // A bulk send (one record) and an announcement wake every watcher.
    let users: Vec<u64> = (0..300).collect();
    sending
        .message_users(users, "to many", Level::Info)
        .expect("bulk send");
    assert!(watch.wait_timeout(DEADLINE), "a bulk send did not wake");
    assert_eq!(
        texts(&watching.get_messages(7_u64).expect("drain")),
        ["to many"]
    );
    sending
        .compose("maintenance tonight", Level::Warning)
        .to_everyone()
        .expect("announce");
    assert!(watch.wait_timeout(DEADLINE), "an announcement did not wake");
    assert_eq!(
        texts(&watching.get_messages(7_u64).expect("drain")),
        ["maintenance tonight"]
    );
}

#[test]
fn a_watcher_behind_a_password_is_woken_too() {
    let Some(server) = RedisServer::builder()
        .password(Some("s3cretpw"))
        .start_or_skip()
    else {
        return;
    };
    let watching = open(&server, "live");
    let sending = open(&server, "live");
    let mut watch = watching.watch("ann").expect("watch");
    sending.info("ann", "through AUTH").expect("send");
    assert!(watch.wait_timeout(DEADLINE), "not woken");
    assert_eq!(
        texts(&watching.get_messages("ann").expect("drain")),
        ["through AUTH"]
    );
}

#[test]
fn a_release_in_another_handle_wakes_a_watcher() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let watching = open(&server, "live");
    let leasing = open(&server, "live");
    leasing
        .info(7_u64, "shown after a failed page")
        .expect("send");
    let lease = leasing.lease_messages(7_u64).expect("lease");
    assert_eq!(texts(lease.messages()), ["shown after a failed page"]);

    let mut watch = watching.watch(7_u64).expect("watch");
    assert!(watching.get_messages(7_u64).expect("drain").is_empty());
    lease.release();
    assert!(watch.wait_timeout(DEADLINE), "the release did not wake");
    assert_eq!(
        texts(&watching.get_messages(7_u64).expect("drain")),
        ["shown after a failed page"]
    );
}

#[test]
fn a_release_wakes_a_watcher_of_the_same_handle() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let store = open(&server, "live");
    store.info(7_u64, "back").expect("send");
    let lease = store.lease_messages(7_u64).expect("lease");
    let mut watch = store.watch(7_u64).expect("watch");
    drop(lease);
    assert!(watch.wait_timeout(DEADLINE), "the release did not wake");
    assert_eq!(texts(&store.get_messages(7_u64).expect("drain")), ["back"]);
}

/// The subscriber reconnects after the server comes back, wakes every
/// watcher then (notices sent meanwhile are lost), and hears the other
/// handle's sends again.
#[test]
fn the_subscriber_survives_a_server_restart() {
    let Some(mut server) = RedisServer::start_or_skip() else {
        return;
    };
    let watching = open(&server, "live");
    let sending = open(&server, "live");
    let mut before = watching.watch(7_u64).expect("watch");
    let subscribers = |server: &RedisServer| server.command(&["PUBSUB", "NUMSUB", "live:live"]);
    assert_eq!(subscribers(&server), "live:live\n:1");

    server.kill();
    server.restart();
    assert!(
        before.wait_timeout(DEADLINE),
        "the watcher was not woken after the reconnect"
    );
    wait_until("the subscriber is back", || {
        subscribers(&server) == "live:live\n:1"
    });

    let mut after = watching.watch(7_u64).expect("watch");
    sending.info(7_u64, "after the restart").expect("send");
    assert!(
        after.wait_timeout(DEADLINE),
        "a send after the restart did not wake"
    );
    assert_eq!(
        texts(&watching.get_messages(7_u64).expect("drain")),
        ["after the restart"]
    );
}

/// The subscriber thread ends with the handle, and with it its connection.
#[test]
fn dropping_the_handle_ends_the_subscription() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let store = open(&server, "live");
    let _watch = store.watch(7_u64).expect("watch");
    let subscribers = || server.command(&["PUBSUB", "NUMSUB", "live:live"]);
    assert_eq!(subscribers(), "live:live\n:1");
    drop(_watch);
    drop(store);
    wait_until("the subscription ends", || subscribers() == "live:live\n:0");
}

/// Expired messages leave Redis without anyone reading: own records, a
/// keyed one, a bulk send (one record) and an announcement, each when its
/// own time comes; a leased one waits for its lease.
#[test]
fn the_reaper_removes_expired_messages_without_reads() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let clock = ManualClock::new();
    let store = open_with_clock(&server, "reap", &clock);
    let minute = Duration::from_secs(60);
    let hour = Duration::from_secs(3600);
    let send = |user: u64, text: &str, after: Duration| {
        store
            .compose(text, Level::Info)
            .expires_after(after)
            .to_user(user)
            .expect("send");
    };
    send(7, "for a minute", minute);
    store
        .compose("keyed, for a minute", Level::Info)
        .expires_after(minute)
        .replace_key("report:1")
        .to_user(7_u64)
        .expect("keyed send");
    send(8, "for an hour", hour);
    send(9, "leased, for a minute", minute);
    let lease = store.lease_messages(9_u64).expect("lease");
    assert_eq!(texts(lease.messages()), ["leased, for a minute"]);
    let users: Vec<u64> = (1000..1300).collect();
    store
        .compose("bulk, for a minute", Level::Info)
        .expires_after(minute)
        .to_users(users)
        .expect("bulk send");
    store
        .compose("announcement, for a minute", Level::Info)
        .expires_after(minute)
        .to_everyone()
        .expect("announce");
    // One recipient takes both: taken sets and the bulk send's counter.
    assert_eq!(
        texts(&store.get_messages(1000_u64).expect("drain")),
        ["bulk, for a minute", "announcement, for a minute"]
    );
    assert_eq!(
        kinds(&server, "reap"),
        ["b", "bc", "bt", "bulks", "exp", "k", "l", "q"]
    );

    clock.advance(minute + Duration::from_secs(1));
    // The minute's bulk send, announcement and user 7's queue go; user 8's
    // hour is not up, and user 9's message is held by the lease.
    wait_until("the minute's messages are reaped", || {
        kinds(&server, "reap") == ["exp", "l", "q"]
    });
    let left = keys(&server, "reap");
    assert!(
        left.iter().filter(|k| k.starts_with("reap:q:")).count() == 1,
        "only user 8's queue is left: {left:?}"
    );
    assert_eq!(server.command(&["ZCARD", "reap:exp"]), ":2");

    // Released after its time: not shown, and reaped.
    lease.release();
    wait_until("the released expired message is reaped", || {
        kinds(&server, "reap") == ["exp", "q"]
    });
    clock.advance(hour);
    wait_until("everything is reaped", || kinds(&server, "reap").is_empty());
    assert!(store.get_messages(8_u64).expect("drain").is_empty());
    assert!(store.get_messages(9_u64).expect("drain").is_empty());
    assert!(store.get_messages("never-seen").expect("drain").is_empty());
}

/// Expiry is judged by the store's clock, whatever Redis's says: reads of
/// another handle whose clock has not moved still show the message.
#[test]
fn expiry_follows_each_handles_clock() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let early = ManualClock::new();
    let late = ManualClock::new();
    late.advance(Duration::from_secs(120));
    let sender = open_with_clock(&server, "clock", &early);
    let after = open_with_clock(&server, "clock", &late);
    sender
        .compose("a minute", Level::Info)
        .expires_after(Duration::from_secs(60))
        .to_user(7_u64)
        .expect("send");
    assert!(after.peek(7_u64).expect("peek").is_empty());
    assert_eq!(after.count(7_u64).expect("count"), 0);
    assert_eq!(texts(&sender.peek(7_u64).expect("peek")), ["a minute"]);
    // A lease by the late handle takes it unshown, and its commit removes it.
    let lease = after.lease_messages(7_u64).expect("lease");
    assert!(lease.messages().is_empty());
    assert!(lease.commit().expect("commit").is_empty());
    assert!(sender.get_messages(7_u64).expect("drain").is_empty());
}

/// An announcement is one record in Redis; every handle's users get it
/// once, users never seen included; taking it does not remove it (it
/// waits for its expiry), and a new handle does not deliver it again.
#[test]
fn an_announcement_reaches_every_user_once_across_handles() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let first = open(&server, "ann");
    first.info(1_u64, "before").expect("send");
    let id = first
        .compose("maintenance tonight", Level::Warning)
        .to_everyone()
        .expect("announce");
    first.info(1_u64, "after").expect("send");
    assert_eq!(first.stats().expect("stats").bulk_records, 1);

    let second = open(&server, "ann");
    assert!(second.may_have_messages("someone-new"));
    assert_eq!(
        texts(&second.get_messages(1_u64).expect("drain")),
        ["before", "maintenance tonight", "after"]
    );
    let shown = first.get_messages("someone-new").expect("drain");
    assert_eq!(texts(&shown), ["maintenance tonight"]);
    assert_eq!(shown[0].id(), id);
    assert!(first.get_messages("someone-new").expect("drain").is_empty());
    assert!(!second.may_have_messages("someone-new"));

    // A lease released gives it back; committed, it is gone for the user.
    let lease = first.lease_messages(2_u64).expect("lease");
    assert_eq!(texts(lease.messages()), ["maintenance tonight"]);
    lease.release();
    let lease = second.lease_messages(2_u64).expect("lease");
    assert_eq!(texts(lease.messages()), ["maintenance tonight"]);
    lease.commit().expect("commit");

    drop((first, second));
    let third = open(&server, "ann");
    for user in [1_u64, 2] {
        assert!(third.get_messages(user).expect("drain").is_empty());
    }
    assert_eq!(
        texts(&third.get_messages(3_u64).expect("drain")),
        ["maintenance tonight"]
    );
    assert_eq!(third.stats().expect("stats").bulk_records, 1);
}

/// A keyed send removes the recipient's queued message with the key in
/// the same script: Redis holds one record, not two.
#[test]
fn a_keyed_send_replaces_the_queued_record_in_redis() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let store = open(&server, "keys");
    for n in 1..=3 {
        store
            .compose(format!("{n} new comments"), Level::Info)
            .replace_key("comments")
            .to_users([7_u64, 8])
            .expect("send");
    }
    let queues: Vec<String> = keys(&server, "keys")
        .into_iter()
        .filter(|k| k.starts_with("keys:q:"))
        .collect();
    assert_eq!(queues.len(), 2, "{queues:?}");
    for queue in &queues {
        assert_eq!(server.command(&["HLEN", queue]), ":1");
    }
    assert_eq!(
        texts(&store.get_messages(7_u64).expect("drain")),
        ["3 new comments"]
    );
    // Delivered: the key is free again, and user 7's hints are gone.
    let hints = |server: &RedisServer| {
        keys(server, "keys")
            .into_iter()
            .filter(|k| k.starts_with("keys:k:"))
            .count()
    };
    assert_eq!(hints(&server), 1);
    store
        .compose("1 new comment", Level::Info)
        .replace_key("comments")
        .to_user(7_u64)
        .expect("send");
    assert_eq!(
        texts(&store.get_messages(7_u64).expect("drain")),
        ["1 new comment"]
    );
    assert_eq!(
        texts(&store.get_messages(8_u64).expect("drain")),
        ["3 new comments"]
    );
    assert_eq!(hints(&server), 0);
}
