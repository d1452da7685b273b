//! Durability when redis-server is killed with SIGKILL (issue 9, item 4).
//!
//! A server with `appendfsync always` (every write is in its append-only
//! file, fsynced, before it answers) is killed with SIGKILL and restarted
//! on the same port, several times, while threads send and drain through
//! one store handle. The handle is never reopened: it reconnects by itself.
//!
//! Promises checked:
//! - an acknowledged send is never lost: it is delivered by exactly one
//!   acknowledged drain (or was taken by a commit that is itself in doubt,
//!   below);
//! - an acknowledged drain never comes back: no message is delivered twice;
//! - a call that failed with `Error::Redis` is in doubt. A failed send may
//!   or may not be stored: it is delivered at most once. A commit that
//!   failed may or may not have removed its messages: they are delivered at
//!   most once later (they come back when the lease times out if it did
//!   not);
//! - nothing is delivered that was never sent, and each drain returns a
//!   sender's messages in send order.
//!
//! Drains here are `lease_messages` then `commit` (what `get_messages`
//! does inside), so that a commit in doubt names its messages.
#![cfg(feature = "redis")]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_messages::{Error, Level, Message, MessageStore};
use common::redis::RedisServer;
use common::{Rng, seed_from_env};

const USERS: u64 = 12;
/// Recipients of the bulk sends who never drain (untracked).
const FILLERS: std::ops::Range<u64> = 50_000..50_300;
const SENDERS: usize = 3;
const DRAINERS: usize = 2;
const KILLS: usize = 5;
const LEASE_TIMEOUT: Duration = Duration::from_secs(2);
const SEED_ENV: &str = "ASYNC_MESSAGES_REDIS_KILL_SEED";

/// What one thread saw.
#[derive(Default)]
struct Seen {
    /// Acknowledged sends: (text, users).
    sent: Vec<(String, Vec<u64>)>,
    /// Sends that failed with `Error::Redis`: may be stored.
    unsure: Vec<(String, Vec<u64>)>,
    /// Acknowledged drains: (user, texts).
    got: Vec<(u64, Vec<String>)>,
    /// Commits that failed with `Error::Redis`: (user, texts) may be
    /// removed; and why they failed.
    unsure_commits: Vec<(u64, Vec<String>)>,
    commit_errors: Vec<String>,
    /// Commits refused as too late (the messages come back).
    expired: usize,
    /// Leases that failed with `Error::Redis` (nothing delivered).
    failed_leases: usize,
}

fn texts(messages: &[Message]) -> Vec<String> {
    messages.iter().map(|m| m.text().to_owned()).collect()
}

/// A pause after a failed call, so that a thread does not spin while the
/// server is down.
fn pause() {
    std::thread::sleep(Duration::from_millis(10));
}

fn sender(store: &MessageStore, thread: usize, seed: u64, stop: &AtomicBool) -> Seen {
    let mut rng = Rng::new(seed ^ (thread as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut seen = Seen::default();
    let mut seq = 0_u64;
    while !stop.load(Ordering::SeqCst) {
        seq += 1;
        let text = format!("t{thread}.{seq}");
        let roll = rng.below(100);
        let (result, users) = if roll < 80 {
            let user = rng.below(USERS);
            (store.info(user, &text).map(|_| ()), vec![user])
        } else if roll < 97 {
            let mut users: Vec<u64> = (0..3).map(|_| rng.below(USERS)).collect();
            users.sort_unstable();
            users.dedup();
            let sent = store.message_users(users.iter().copied(), &text, Level::Info);
            (sent.map(|_| ()), users)
        } else {
            let sent = store.message_users((0..USERS).chain(FILLERS), &text, Level::Info);
            (sent.map(|_| ()), (0..USERS).collect())
        };
        match result {
            Ok(()) => seen.sent.push((text, users)),
            Err(Error::Redis { .. }) => {
                seen.unsure.push((text, users));
                pause();
            }
            Err(other) => panic!("send {text}: {other}"),
        }
        std::thread::sleep(Duration::from_micros(rng.below(2000)));
    }
    seen
}

fn drainer(store: &MessageStore, thread: usize, seed: u64, stop: &AtomicBool) -> Seen {
    let mut rng = Rng::new(seed ^ (thread as u64 + 101).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut seen = Seen::default();
    while !stop.load(Ordering::SeqCst) {
        let user = rng.below(USERS);
        let lease = match store.lease_messages(user) {
            Ok(lease) => lease,
            Err(Error::Redis { .. }) => {
                seen.failed_leases += 1;
                pause();
                continue;
            }
            Err(other) => panic!("lease {user}: {other}"),
        };
        let leased = texts(lease.messages());
        if leased.is_empty() {
            continue;
        }
        match lease.commit() {
            Ok(got) => {
                assert_eq!(texts(&got), leased, "a commit returns what was leased");
                seen.got.push((user, leased));
            }
            Err(Error::LeaseExpired { .. }) => seen.expired += 1,
            Err(error @ Error::Redis { .. }) => {
                seen.unsure_commits.push((user, leased));
                seen.commit_errors.push(error.to_string());
                pause();
            }
            Err(other) => panic!("commit {user}: {other}"),
        }
        std::thread::sleep(Duration::from_micros(rng.below(2000)));
    }
    seen
}

#[test]
fn kill_9_of_redis_server_loses_no_acknowledged_send_and_brings_back_no_acknowledged_drain() {
    let Some(server) = RedisServer::builder().appendfsync("always").start_or_skip() else {
        return;
    };
    let started = Instant::now();
    let seed = seed_from_env(SEED_ENV);
    let outcome = run(server, KILLS, seed);
    let context = format!("(seed {seed}: rerun with {SEED_ENV}={seed})");
    assert!(
        outcome.lost.is_empty(),
        "lost {context}: {:?}",
        outcome.lost
    );
    assert!(
        outcome.duplicates.is_empty(),
        "delivered twice {context}: {:?}",
        outcome.duplicates
    );
    assert!(
        outcome.never_sent.is_empty(),
        "never sent {context}: {:?}",
        outcome.never_sent
    );
    assert!(
        outcome.order_violations.is_empty(),
        "out of order {context}: {:?}",
        outcome.order_violations
    );
    assert!(
        outcome.acked > 100,
        "too few acknowledged sends to prove anything {context}"
    );
    println!("(seed {seed}; {:.1?} in all)", started.elapsed());
}

/// The control: the same run against a server that keeps nothing on disk
/// (`--appendonly no`) loses acknowledged sends at each kill, and the check
/// sees it.
#[test]
fn the_check_catches_a_server_that_forgets_what_it_acknowledged() {
    let Some(server) = RedisServer::builder()
        .arg("--appendonly")
        .arg("no")
        .start_or_skip()
    else {
        return;
    };
    let seed = seed_from_env(SEED_ENV);
    let outcome = run(server, 2, seed);
    assert!(
        !outcome.lost.is_empty(),
        "a server without persistence lost nothing? (seed {seed})"
    );
}

/// Sends and drains on threads while `server` is killed and restarted
/// `kills` times; then drains what is left and compares.
fn run(mut server: RedisServer, kills: usize, seed: u64) -> Outcome {
    let mut rng = Rng::new(seed);
    let store = MessageStore::builder()
        .redis(server.url())
        .namespace("kill-9")
        .lease_timeout(LEASE_TIMEOUT)
        .open()
        .expect("open");
    let stop = AtomicBool::new(false);

    let mut seen: Vec<Seen> = std::thread::scope(|scope| {
        let mut threads = Vec::new();
        for thread in 0..SENDERS {
            let (store, stop) = (&store, &stop);
            threads.push(scope.spawn(move || sender(store, thread, seed, stop)));
        }
        for thread in 0..DRAINERS {
            let (store, stop) = (&store, &stop);
            threads.push(scope.spawn(move || drainer(store, thread, seed, stop)));
        }
        for _ in 0..kills {
            std::thread::sleep(Duration::from_millis(300 + rng.below(500)));
            server.kill();
            std::thread::sleep(Duration::from_millis(50 + rng.below(250)));
            server.restart();
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        threads
            .into_iter()
            .map(|thread| thread.join().expect("a worker thread panicked"))
            .collect()
    });

    // What is left, the same handle: leases whose reply was lost come back
    // after the lease timeout.
    let mut last = Seen::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for user in 0..USERS {
            let got = store.get_messages(user).expect("drain after the kills");
            if !got.is_empty() {
                last.got.push((user, texts(&got)));
            }
        }
        let left: usize = (0..USERS)
            .map(|user| store.count(user).expect("count"))
            .sum();
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} messages still leased after 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    seen.push(last);
    check(&seen, kills)
}

/// What went wrong, if anything: `(user, text)` pairs.
struct Outcome {
    acked: usize,
    lost: Vec<(u64, String)>,
    duplicates: Vec<((u64, String), usize)>,
    never_sent: Vec<(u64, String)>,
    order_violations: Vec<String>,
}

fn check(seen: &[Seen], kills: usize) -> Outcome {
    let pairs = |list: &[(String, Vec<u64>)]| -> Vec<(u64, String)> {
        list.iter()
            .flat_map(|(text, users)| users.iter().map(move |u| (*u, text.clone())))
            .collect()
    };
    let acked: Vec<(u64, String)> = seen.iter().flat_map(|s| pairs(&s.sent)).collect();
    let unsure: Vec<(u64, String)> = seen.iter().flat_map(|s| pairs(&s.unsure)).collect();
    let mut delivered: HashMap<(u64, &str), usize> = HashMap::new();
    let mut order_violations = Vec::new();
    for (user, texts) in seen.iter().flat_map(|s| &s.got) {
        let mut last: HashMap<&str, u64> = HashMap::new();
        for text in texts {
            *delivered.entry((*user, text.as_str())).or_default() += 1;
            let (from, seq) = text.split_once('.').expect("tTHREAD.SEQ");
            let seq: u64 = seq.parse().expect("seq");
            if last.insert(from, seq).is_some_and(|prev| prev >= seq) {
                order_violations.push(format!("user {user}: {texts:?}"));
            }
        }
    }
    let mut in_doubt_commit: HashMap<(u64, &str), usize> = HashMap::new();
    for (user, texts) in seen.iter().flat_map(|s| &s.unsure_commits) {
        for text in texts {
            *in_doubt_commit.entry((*user, text.as_str())).or_default() += 1;
        }
    }
    let count = |pair: &(u64, String)| {
        delivered
            .get(&(pair.0, pair.1.as_str()))
            .copied()
            .unwrap_or(0)
    };
    let doubtful_take =
        |pair: &(u64, String)| in_doubt_commit.contains_key(&(pair.0, pair.1.as_str()));
    let lost: Vec<&(u64, String)> = acked
        .iter()
        .filter(|pair| count(pair) == 0 && !doubtful_take(pair))
        .collect();
    let duplicates: Vec<(&(u64, String), usize)> = acked
        .iter()
        .chain(&unsure)
        .map(|pair| (pair, count(pair)))
        .filter(|(_, n)| *n > 1)
        .collect();
    let unsure_stored = unsure.iter().filter(|pair| count(pair) == 1).count();
    let sent_texts: std::collections::HashSet<(u64, &str)> = acked
        .iter()
        .chain(&unsure)
        .map(|(u, t)| (*u, t.as_str()))
        .collect();
    let never_sent: Vec<&(u64, &str)> = delivered
        .keys()
        .filter(|pair| !sent_texts.contains(*pair))
        .collect();
    let commit_back = in_doubt_commit
        .keys()
        .filter(|pair| delivered.contains_key(*pair))
        .count();
    let failed_leases: usize = seen.iter().map(|s| s.failed_leases).sum();
    let expired: usize = seen.iter().map(|s| s.expired).sum();
    let drains: usize = seen.iter().map(|s| s.got.len()).sum();
    println!(
        "kill -9 of redis-server: {} acknowledged messages ({} deliveries in {drains} drains), \
         {} threads, {kills} kills, lost {}, duplicates {}; in doubt: {} sends ({} stored), \
         {} commits ({} messages: {} came back, {} taken by the commit), \
         {failed_leases} failed leases, {expired} expired leases",
        acked.len(),
        delivered.values().sum::<usize>(),
        SENDERS + DRAINERS,
        lost.len(),
        duplicates.len(),
        unsure.len(),
        unsure_stored,
        seen.iter().map(|s| s.unsure_commits.len()).sum::<usize>(),
        in_doubt_commit.len(),
        commit_back,
        in_doubt_commit.len() - commit_back,
    );
    for error in seen.iter().flat_map(|s| &s.commit_errors) {
        println!("  a commit in doubt: {error}");
    }
    let owned = |pair: &(u64, &str)| (pair.0, pair.1.to_owned());
    Outcome {
        acked: acked.len(),
        lost: lost.into_iter().cloned().collect(),
        duplicates: duplicates
            .into_iter()
            .map(|(pair, n)| (pair.clone(), n))
            .collect(),
        never_sent: never_sent.into_iter().map(owned).collect(),
        order_violations,
    }
}
