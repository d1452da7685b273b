//! What every engine promises at the seam (`src/engine/mod.rs`), beyond the
//! behaviour suites they share (`original_suite.rs`, `user_isolation.rs`,
//! `concurrent_drain.rs`, `bulk_record.rs`, `model.rs`, ...): leases that
//! time out or are released come back in their place, a second handle sees
//! what the first sent, reads that overlap on one handle see every send
//! that returned, Redis namespaces keep apart, a damaged record is moved
//! aside, and the builder and a bad Redis URL give typed errors.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use async_messages::{Error, Level, MessageStore, Result, UserId};
use common::engines::{Engine, fast};
use common::{TestDir, texts};

/// More recipients than a send to a few users: one bulk record.
const MANY: u64 = 1_000;

/// Short enough to wait for, long enough that a test is not preempted past
/// it between two steps that must fall inside one lease.
const LEASE_TIMEOUT: Duration = Duration::from_secs(1);

/// Sleeps until `timeout` has surely passed since `since`.
fn wait_past(since: Instant, timeout: Duration) {
    let until = since + timeout + Duration::from_millis(200);
    thread::sleep(until.saturating_duration_since(Instant::now()));
}

/// A lease held past the lease timeout: its messages come back, its commit
/// is `Error::LeaseExpired` and removes nothing, and they are drained once,
/// in their original order among the others.
fn a_lease_held_past_the_timeout_comes_back(engine: Engine) -> Result<()> {
    let store = engine.open_with(|builder| builder.lease_timeout(LEASE_TIMEOUT))?;
    store.info(1_u64, "first")?;
    store.message_users(0..MANY, "second (bulk)", Level::Info)?;
    store.info(1_u64, "third")?;
    let leased_at = Instant::now();
    let lease = store.lease_messages(1_u64)?;
    assert_eq!(texts(lease.messages()), ["first", "second (bulk)", "third"]);
    assert!(store.get_messages(1_u64)?.is_empty(), "hidden while held");
    store.info(1_u64, "fourth")?;
    wait_past(leased_at, LEASE_TIMEOUT);

    let error = lease.commit().unwrap_err();
    assert!(
        matches!(error, Error::LeaseExpired { timeout } if timeout == LEASE_TIMEOUT),
        "{error:?}"
    );
    assert!(error.to_string().contains("lease timeout"), "{error}");
    let all = ["first", "second (bulk)", "third", "fourth"];
    assert_eq!(texts(&store.peek(1_u64)?), all, "nothing removed");
    assert_eq!(texts(&store.get_messages(1_u64)?), all);
    assert!(store.get_messages(1_u64)?.is_empty(), "drained once");
    // Another recipient of the bulk send still has it.
    assert_eq!(texts(&store.get_messages(2_u64)?), ["second (bulk)"]);
    Ok(())
}

/// Once a lease has expired, another lease takes its messages; the first
/// lease can then neither remove them (its commit fails) nor give them back
/// (its release leaves the new lease's hold alone).
fn an_expired_lease_cannot_touch_what_a_later_lease_took(engine: Engine) -> Result<()> {
    let store = engine.open_with(|builder| builder.lease_timeout(LEASE_TIMEOUT))?;
    store.info(1_u64, "a")?;
    store.message_users(0..MANY, "b (bulk)", Level::Info)?;
    let leased_at = Instant::now();
    let first = store.lease_messages(1_u64)?;
    assert_eq!(texts(first.messages()), ["a", "b (bulk)"]);
    assert!(
        store.lease_messages(1_u64)?.messages().is_empty(),
        "the first lease holds them"
    );
    wait_past(leased_at, LEASE_TIMEOUT);

    // Lease two takes them over; lease one's release must not free them.
    let second_at = Instant::now();
    let second = store.lease_messages(1_u64)?;
    assert_eq!(texts(second.messages()), ["a", "b (bulk)"]);
    first.release();
    assert!(
        store.get_messages(1_u64)?.is_empty(),
        "an expired lease's release freed messages another lease holds"
    );
    // Lease three takes them over once lease two has expired too; lease
    // two's commit then fails and removes nothing.
    wait_past(second_at, LEASE_TIMEOUT);
    let third = store.lease_messages(1_u64)?;
    assert_eq!(texts(third.messages()), ["a", "b (bulk)"]);
    let error = second.commit().unwrap_err();
    assert!(matches!(error, Error::LeaseExpired { .. }), "{error:?}");
    assert_eq!(store.count(1_u64)?, 2, "an expired commit removed nothing");
    assert_eq!(texts(&third.commit()?), ["a", "b (bulk)"]);
    assert!(store.get_messages(1_u64)?.is_empty());
    assert_eq!(store.count(1_u64)?, 0);
    Ok(())
}

/// A released (or dropped) lease's messages go back to their place in the
/// queue, between messages sent before and after, and around messages
/// another lease still holds.
fn a_released_lease_comes_back_in_its_original_place(engine: Engine) -> Result<()> {
    let store = engine.open_fast()?;
    store.info(1_u64, "one")?;
    store.message_users(0..MANY, "two (bulk)", Level::Info)?;
    store.info(1_u64, "three")?;
    let first = store.lease_messages(1_u64)?;
    assert_eq!(texts(first.messages()), ["one", "two (bulk)", "three"]);
    store.message_users([1_u64, 2], "four (few)", Level::Info)?;
    let second = store.lease_messages(1_u64)?;
    assert_eq!(texts(second.messages()), ["four (few)"]);
    store.info(1_u64, "five")?;

    first.release();
    let all = ["one", "two (bulk)", "three", "four (few)", "five"];
    assert_eq!(texts(&store.peek(1_u64)?), all);
    // "four" is still held: the others, in their order around it.
    let third = store.lease_messages(1_u64)?;
    assert_eq!(
        texts(third.messages()),
        ["one", "two (bulk)", "three", "five"]
    );
    drop(third);
    second.release();
    assert_eq!(texts(&store.get_messages(1_u64)?), all);
    assert!(store.get_messages(1_u64)?.is_empty());
    Ok(())
}

/// `may_have_messages` on one handle sees a send made through another: on
/// Redis a second handle opened on the same URL and namespace (as another
/// process would); sled allows one handle per process and memory has no
/// other, so there it is a clone of the handle.
fn may_have_messages_sees_a_send_through_another_handle(engine: Engine) -> Result<()> {
    // One index slot per user on sled, so that "may have" is exact here.
    let store = engine.open_with(|builder| builder.index_slots(1 << 16))?;
    let other = store.another_handle()?;
    assert!(!store.may_have_messages(1_u64));
    other.info(1_u64, "through the other handle")?;
    assert!(store.may_have_messages(1_u64));
    assert_eq!(
        texts(&store.get_messages(1_u64)?),
        ["through the other handle"]
    );
    assert!(!store.may_have_messages(1_u64));
    assert!(!other.may_have_messages(1_u64));

    // A bulk send this handle has not seen yet.
    assert!(!store.may_have_messages(3_u64));
    assert!(store.peek(3_u64)?.is_empty());
    other.message_users(0..MANY, "bulk through the other handle", Level::Info)?;
    assert!(store.may_have_messages(3_u64));
    assert_eq!(
        texts(&store.get_messages(3_u64)?),
        ["bulk through the other handle"]
    );
    assert!(other.get_messages(3_u64)?.is_empty(), "taken once");
    assert!(!store.may_have_messages(3_u64));
    assert!(!other.may_have_messages(3_u64));
    assert!(other.may_have_messages(4_u64));
    assert_eq!(texts(&other.get_messages(4_u64)?).len(), 1);
    Ok(())
}

/// Threads send bulk messages while others peek at recipients through the
/// same handle: a peek shows every send that returned before it started,
/// and at the end every recipient drains every message once. (On Redis each
/// peek may refresh the handle's cache of bulk sends while others do too and
/// more bulk sends commit.)
fn a_peek_shows_every_send_that_returned_before_it(engine: Engine) -> Result<()> {
    const USERS: u64 = 4;
    const SENDERS: u64 = 3;
    const SENDS: u64 = 150;
    let store = engine.open_fast()?;
    let next = AtomicU64::new(0);
    let returned: Vec<AtomicBool> = (0..SENDS).map(|_| AtomicBool::new(false)).collect();
    let sending = AtomicBool::new(true);
    let numbers = |messages: Vec<async_messages::Message>| -> Vec<u64> {
        messages
            .iter()
            .map(|m| m.text().parse().expect("a send number"))
            .collect()
    };
    thread::scope(|scope| -> Result<()> {
        let senders: Vec<_> = (0..SENDERS)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let n = next.fetch_add(1, Ordering::SeqCst);
                        if n >= SENDS {
                            return Ok(());
                        }
                        let users = (0..USERS).chain(1_000..1_300);
                        store.message_users(users, n.to_string(), Level::Info)?;
                        returned[n as usize].store(true, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        let watchers: Vec<_> = (0..USERS)
            .map(|user| {
                let (store, returned, sending) = (&store, &returned, &sending);
                scope.spawn(move || -> Result<()> {
                    while sending.load(Ordering::SeqCst) {
                        let before: Vec<u64> = (0..SENDS)
                            .filter(|n| returned[*n as usize].load(Ordering::SeqCst))
                            .collect();
                        let shown = numbers(store.peek(user)?);
                        let missing: Vec<&u64> =
                            before.iter().filter(|n| !shown.contains(n)).collect();
                        assert!(
                            missing.is_empty(),
                            "user {user}: sends {missing:?} had returned, but a peek after them does not show them"
                        );
                    }
                    Ok(())
                })
            })
            .collect();
        let sent = senders
            .into_iter()
            .try_for_each(|sender| sender.join().expect("sender"));
        sending.store(false, Ordering::SeqCst);
        for watcher in watchers {
            watcher.join().expect("watcher")?;
        }
        sent
    })?;
    let all: Vec<u64> = (0..SENDS).collect();
    for user in 0..USERS {
        let mut got = numbers(store.get_messages(user)?);
        got.sort_unstable();
        assert_eq!(got, all, "user {user}");
        assert!(store.get_messages(user)?.is_empty());
    }
    Ok(())
}

/// Reads that overlap on one handle while another handle sends: a bulk
/// send that has returned is seen by every later read. The reads are timed
/// so that a slow one (reading a large bulk send, which a first read is also
/// reading) outlasts a quick one that starts once the first is done and sees
/// a newer send. On Redis each read may refresh the handle's cache of bulk
/// sends: the slow refresh must not drop what the quick one added. (The
/// slow read starts at a different time in each try, up to a third of a
/// first read's time after it, so that some tries fall in the window.)
fn overlapping_reads_keep_a_newer_bulk_send(engine: Engine) -> Result<()> {
    const LARGE: usize = 8 << 20;
    const TRIES: u32 = 8;
    let stores = engine.stores();
    let open = || -> Result<_> {
        let store = stores.open_with(|builder| fast(builder).max_message_bytes(2 * LARGE))?;
        let other = store.another_handle()?;
        // Connections made and scripts loaded: reads then take only as
        // long as their work.
        thread::scope(|scope| {
            let warm = [
                scope.spawn(|| store.peek(7_u64)),
                scope.spawn(|| store.peek(7_u64)),
            ];
            warm.map(|read| read.join().expect("warm-up read"))
        })
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
        Ok((store, other))
    };
    let large = format!("large {}", "x".repeat(LARGE));
    let recipients = || (0..8_u64).chain(1_000..1_000 + MANY);

    // How long a first read of a large bulk send takes.
    let (store, other) = open()?;
    other.message_users(recipients(), large.as_str(), Level::Info)?;
    let started = Instant::now();
    assert!(store.may_have_messages(0_u64));
    let slow = started.elapsed();
    drop((store, other));

    for attempt in 1..=TRIES {
        let (store, other) = open()?;
        other.message_users(recipients(), large.as_str(), Level::Info)?;
        let handle: &MessageStore = &store;
        thread::scope(|scope| -> Result<()> {
            // "May have" reads: no large text to copy once the cache is
            // read, so each returns as soon as its refresh is done.
            let first = scope.spawn(|| handle.may_have_messages(1_u64));
            // While the first read is still at the large send.
            thread::sleep(slow * attempt / (3 * TRIES));
            let slow_read = scope.spawn(|| handle.may_have_messages(2_u64));
            assert!(first.join().expect("first read"));
            other.message_users(recipients(), "newer", Level::Info)?;
            // A quick read that sees the newer send.
            assert!(handle.may_have_messages(3_u64));
            assert!(slow_read.join().expect("slow read"));
            Ok(())
        })?;
        let shown: Vec<String> = texts(&store.peek(4_u64)?)
            .iter()
            .map(|text| text.chars().take(5).collect())
            .collect();
        assert_eq!(
            shown,
            ["large", "newer"],
            "try {attempt}: the newer bulk send is gone from this handle's reads (a first read took {slow:?})"
        );
        assert_eq!(store.get_messages(5_u64)?.len(), 2, "try {attempt}");
    }
    Ok(())
}

/// A record whose level is not one of the five, written into the store
/// behind its back: reading the user is `Error::Corrupt`, the record goes
/// to quarantine, and the user's other messages and other users are kept.
/// Only where records can be written behind the store's back: not in memory.
fn a_record_with_an_unknown_level_is_quarantined(engine: Engine) -> Result<()> {
    // Format version 1, an inline message (variant 0), level 99, sent at
    // 5 ms, a one-byte text "x" (the codec in src/record.rs).
    let bad: &[u8] = &[1, 0, 99, 5, 1, b'x'];
    let mut user_1 = vec![0x01];
    user_1.extend_from_slice(&1_u64.to_be_bytes());
    let mut store = engine.open()?;
    store.info(1_u64, "good, first")?;
    store.info(1_u64, "good, second")?;
    store.info(2_u64, "other user")?;
    match engine {
        Engine::Sled => {
            let path = store.path().to_path_buf();
            store.close();
            let db = common::raw_db(&path);
            let mut key = user_1.clone();
            key.extend_from_slice(&(u64::MAX / 2).to_be_bytes());
            db.open_tree("messages")
                .expect("messages tree")
                .insert(key, bad)
                .expect("insert");
            db.flush().expect("flush");
            drop(db);
            store.reopen()?;
        }
        Engine::Redis => {
            let server = store.server().expect("a Redis fixture has a server");
            let namespace = store.namespace().expect("a Redis fixture has a namespace");
            let key = format!(
                "{namespace}:q:{}",
                std::str::from_utf8(&user_1).expect("ASCII")
            );
            let reply = server.command(&[
                "HSET",
                &key,
                &format!("{:020}", 1_u64 << 40),
                std::str::from_utf8(bad).expect("ASCII"),
            ]);
            assert_eq!(reply, ":1", "HSET {key:?}");
        }
        Engine::Memory => unreachable!("not run in memory"),
    }
    let error = store.get_messages(1_u64).unwrap_err();
    assert!(
        matches!(&error, Error::Corrupt { what, reason }
            if what.contains("user 1") && reason.contains("unknown level 99")),
        "{error:?}"
    );
    assert_eq!(texts(&store.get_messages(2_u64)?), ["other user"]);
    assert_eq!(
        texts(&store.get_messages(1_u64)?),
        ["good, first", "good, second"]
    );
    let quarantined = store.quarantined()?;
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(
        quarantined[0].reason().contains("unknown level 99"),
        "{quarantined:?}"
    );
    store.info(1_u64, "fresh")?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["fresh"]);
    Ok(())
}

/// Two namespaces on one Redis server are two stores: messages, bulk
/// sends, leases and "may have" never cross, even where one namespace is a
/// prefix of the other.
fn two_namespaces_on_one_redis_server_are_isolated(engine: Engine) -> Result<()> {
    let fixture = engine.open()?;
    let url = fixture
        .server()
        .expect("a Redis fixture has a server")
        .url();
    let open = |namespace: &str| {
        MessageStore::builder()
            .redis(&url)
            .namespace(namespace)
            .open()
    };
    let names = ["shop", "shop:b", "shop:q", "blog"];
    let stores = names.map(open);
    let stores: Vec<MessageStore> = stores.into_iter().collect::<Result<_>>()?;
    for (name, store) in names.iter().zip(&stores) {
        store.info(1_u64, format!("{name}: direct"))?;
        store.info("ann", format!("{name}: for ann"))?;
        store.message_users(0..MANY, format!("{name}: bulk"), Level::Info)?;
    }
    let blog = &stores[3];
    blog.message_users(0..MANY, "blog: second bulk", Level::Info)?;
    // A lease in one namespace hides nothing in the others.
    let lease = stores[0].lease_messages(1_u64)?;
    assert_eq!(texts(lease.messages()), ["shop: direct", "shop: bulk"]);
    for (name, store) in names.iter().zip(&stores).skip(1) {
        let mut want = vec![format!("{name}: direct"), format!("{name}: bulk")];
        if *name == "blog" {
            want.push("blog: second bulk".to_owned());
        }
        assert_eq!(texts(&store.peek(1_u64)?), want, "{name}");
        assert_eq!(texts(&store.get_messages(1_u64)?), want, "{name}");
        assert_eq!(
            texts(&store.get_messages("ann")?),
            [format!("{name}: for ann")]
        );
        assert!(!store.may_have_messages(1_u64), "{name}");
    }
    lease.release();
    assert!(stores[0].may_have_messages(1_u64));
    assert_eq!(stores[0].count(1_u64)?, 2);
    assert_eq!(stores[0].count("ann")?, 1);
    // A fresh namespace on the same server is empty.
    let fresh = open("fresh")?;
    for user in [
        UserId::from(1_u64),
        UserId::from(7_u64),
        UserId::from("ann"),
    ] {
        assert!(!fresh.may_have_messages(&user), "{user}");
        assert!(fresh.peek(&user)?.is_empty(), "{user}");
    }
    assert!(fresh.quarantined()?.is_empty());
    Ok(())
}

engine_tests! {
    a_lease_held_past_the_timeout_comes_back,
    an_expired_lease_cannot_touch_what_a_later_lease_took,
    a_released_lease_comes_back_in_its_original_place,
    may_have_messages_sees_a_send_through_another_handle,
    a_peek_shows_every_send_that_returned_before_it,
    overlapping_reads_keep_a_newer_bulk_send,
    a_record_with_an_unknown_level_is_quarantined: Sled | Redis,
    two_namespaces_on_one_redis_server_are_isolated: Redis,
}

#[test]
fn a_path_and_a_redis_url_are_two_engines() {
    let dir = TestDir::new();
    let path = dir.store_path();
    let error = MessageStore::builder()
        .path(&path)
        .redis("redis://:s3cret@127.0.0.1:6379/0")
        .open()
        .unwrap_err();
    assert!(
        matches!(&error, Error::TwoEngines { chosen }
            if chosen.contains(&format!("path({})", path.display()))
                && chosen.contains("redis(redis://:***@127.0.0.1:6379/0)")),
        "{error:?}"
    );
    let shown = error.to_string();
    assert!(shown.contains("keep only one"), "{shown}");
    assert!(!format!("{shown} {error:?}").contains("s3cret"), "{shown}");
    assert!(!path.exists(), "nothing was created at the path");

    for builder in [
        MessageStore::builder().path(&path).in_memory(),
        MessageStore::builder()
            .redis("redis://127.0.0.1/")
            .in_memory(),
    ] {
        let error = builder.open().unwrap_err();
        assert!(
            matches!(&error, Error::TwoEngines { chosen } if chosen.contains("in_memory()")),
            "{error:?}"
        );
    }
    assert!(!path.exists(), "nothing was created at the path");
}

#[test]
fn a_builder_without_a_place_is_no_path() {
    let error = MessageStore::builder().open().unwrap_err();
    assert!(matches!(error, Error::NoPath), "{error:?}");
    let shown = error.to_string();
    for fix in [".path(..)", ".redis(..)", "in_memory()"] {
        assert!(shown.contains(fix), "{shown}");
    }
    // The settings of every engine do not make a place.
    let error = MessageStore::builder()
        .namespace("app")
        .lease_timeout(Duration::from_secs(5))
        .open()
        .unwrap_err();
    assert!(matches!(error, Error::NoPath), "{error:?}");
}

/// A Redis URL that nothing listens on is `Error::Redis`, at once, naming
/// the URL, with a password shown as `***`. (Without feature `redis` it is
/// `Error::Redis` too, saying the feature is off.)
#[test]
fn a_redis_url_nothing_listens_on_is_a_redis_error_naming_it() {
    // A port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
        .port();
    for (url, shown_as) in [
        (
            format!("redis://127.0.0.1:{port}/0"),
            format!("redis://127.0.0.1:{port}/0"),
        ),
        (
            format!("redis://:s3cret@127.0.0.1:{port}/0"),
            format!("redis://:***@127.0.0.1:{port}/0"),
        ),
        (
            format!("redis://app:s3cret@127.0.0.1:{port}/0"),
            format!("redis://app:***@127.0.0.1:{port}/0"),
        ),
    ] {
        let started = Instant::now();
        let error = MessageStore::builder().redis(&url).open().unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert!(
            matches!(&error, Error::Redis { url: named, .. } if *named == shown_as),
            "{error:?}"
        );
        let shown = error.to_string();
        assert!(shown.contains(&shown_as), "{shown}");
        assert!(
            !format!("{shown} {error:?}").contains("s3cret"),
            "the password leaks: {shown} / {error:?}"
        );
    }
}
