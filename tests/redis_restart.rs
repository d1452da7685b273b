//! The Redis engine through a server restart: three bugs found by
//! `tests/redis_durability.rs` and `tests/redis_unavailable.rs`, each failing
//! before its fix (a commit gave up on `-LOADING`; a live handle's bulk cache
//! outlived the server's data; the first send after a quick restart ran on a
//! connection to the old server).
#![cfg(feature = "redis")]

mod common;

use std::time::{Duration, Instant};

use async_messages::{Level, MessageStore};
use common::redis::RedisServer;
use common::texts;

/// A restarted redis-server answers `-LOADING` while it replays its AOF
/// (it serves clients between chunks of the file). A commit keeps trying
/// for 4 s when the connection fails, but gives up at once on `-LOADING`:
/// the caller gets `Error::Redis` although the server is back a moment
/// later. When the first try had been applied before the kill (its reply
/// lost), the messages are removed while `get_messages` reports an error:
/// lost, in `tests/redis_durability.rs` 4 runs of 12 ("taken by the
/// commit").
///
/// The commit waits out the loading (within its 4 s) and returns the
/// messages.
#[test]
fn a_commit_waits_while_the_restarted_server_loads_its_aof() {
    // Loading made slow and served in small chunks: 3,000 keys at 500 µs
    // each, about 1.5 s, events processed every 1 KiB.
    let Some(mut server) = RedisServer::builder()
        .appendfsync("always")
        .arg("--key-load-delay")
        .arg("500")
        .arg("--loading-process-events-interval-bytes")
        .arg("1024")
        .start_or_skip()
    else {
        return;
    };
    server.command(&[
        "EVAL",
        "for i = 1, 3000 do redis.call('SET', 'filler:' .. i, i) end",
        "0",
    ]);
    // Into the AOF's RDB part, where the load delay applies.
    server.command(&["BGREWRITEAOF"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server
        .command(&["INFO", "persistence"])
        .contains("aof_rewrite_in_progress:0")
    {
        assert!(Instant::now() < deadline, "the AOF rewrite did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    let store = MessageStore::builder()
        .redis(server.url())
        .lease_timeout(Duration::from_secs(60))
        .open()
        .expect("open");
    store.info(1_u64, "shown once").expect("send");
    let lease = store.lease_messages(1_u64).expect("lease");

    server.kill();
    let restarting = std::thread::spawn(move || {
        server.restart();
        server
    });
    let started = Instant::now();
    let committed = lease.commit();
    let took = started.elapsed();
    let server = restarting.join().expect("restart");
    let committed = committed.unwrap_or_else(|error| {
        panic!("the commit gave up after {took:?}, while the server loaded its AOF: {error}")
    });
    assert_eq!(texts(&committed), ["shown once"]);
    assert_eq!(store.count(1_u64).expect("count"), 0);
    drop(server);
}

/// Message ids are a counter on the server. A server that loses its data
/// (no AOF, a restart from an RDB snapshot, a FLUSHALL, a failover to a
/// replica that was behind) counts again from 1. Each process caches the
/// bulk sends it has read by id, and keeps serving the old text for a new
/// bulk send that reuses the id: the recipients see an old message again
/// and never the new one, until the process restarts. (A send to a few
/// users is not affected: it is read from the server each time.)
///
/// Fixed by naming the data set (`ns:epoch`): a cache read from another
/// data set starts again. A live handle delivers the new bulk send's text.
#[test]
fn a_live_handle_delivers_a_new_bulk_send_after_the_server_lost_its_data() {
    let Some(mut server) = RedisServer::builder()
        .arg("--appendonly")
        .arg("no")
        .start_or_skip()
    else {
        return;
    };
    // Two processes' handles: one sends, the other shows the messages (a
    // handle that sent a bulk send has it in its cache already).
    let url = server.url();
    let open = || MessageStore::builder().redis(&url).open().expect("open");
    let (sender, reader) = (open(), open());
    let many: Vec<u64> = (1..=300).collect();
    sender
        .message_users(many.iter().copied(), "first", Level::Info)
        .expect("bulk send");
    assert_eq!(
        texts(&reader.get_messages(1_u64).expect("drain")),
        ["first"]
    );

    // Killed and restarted without persistence: an empty server.
    server.kill();
    server.restart();
    // Reads first: they are retried on a fresh connection, which clears
    // the pools of connections to the old server (see the next test).
    assert!(sender.peek(2_u64).expect("peek").is_empty());
    assert!(reader.peek(3_u64).expect("peek").is_empty());
    sender
        .message_users(many.iter().copied(), "second", Level::Info)
        .expect("bulk send");
    assert_eq!(
        texts(&open().get_messages(3_u64).expect("drain")),
        ["second"],
        "a new handle reads the record"
    );
    assert_eq!(
        texts(&reader.get_messages(2_u64).expect("drain")),
        ["second"],
        "the live handle delivers what was sent, not the old bulk send's text"
    );
}

/// The pool pinged a connection before reuse only when it had been idle for
/// a second; now 100 ms, shorter than any restart. After a quick restart (or a failover) the next call on a
/// connection used within that second runs on a connection to the dead
/// server; a read is retried on a new connection, but a send is not (it is
/// not safe to run twice), so it fails with `Error::Redis` ("unexpected end
/// of file") although no server ever saw it. Every pooled connection (up to
/// 32) can fail one send this way after each restart.
///
/// The first send after the server is back succeeds.
#[test]
fn the_first_send_after_a_quick_restart_succeeds() {
    let Some(mut server) = RedisServer::start_or_skip() else {
        return;
    };
    let store = MessageStore::builder()
        .redis(server.url())
        .open()
        .expect("open");
    store.info(1_u64, "before").expect("send");
    server.kill();
    server.restart();
    let sent = store.info(1_u64, "after");
    assert!(
        sent.is_ok(),
        "the first send after the restart failed: {sent:?}"
    );
    assert_eq!(
        texts(&store.get_messages(1_u64).expect("drain")),
        ["before", "after"]
    );
}
