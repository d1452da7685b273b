//! Four processes, twenty users, one Redis namespace, one process killed
//! while it holds leases (issue 9, item 8).
//!
//! Four child processes (this test binary re-run as its ignored test
//! `worker_child`) send to and drain the same 20 users at once: single
//! sends, sends to a few users, and bulk sends (stored once) to all 20 plus
//! 300 users who never drain; drains by `get_messages` and by lease then
//! commit. Each child writes every acknowledged call to its own log file,
//! one line per call, written whole (one `write`) before the next call, so
//! a SIGKILL loses no acknowledged line:
//!
//! ```text
//! sent TEXT USERS          a send was acknowledged (USERS: 0,4,7 or `all`)
//! unsure TEXT USERS        a send failed: it may or may not be stored
//! got START END USER TEXTS a drain (or a lease's commit) returned TEXTS
//!                          (START, END: the call's wall clock, in ns)
//! expired USER TEXTS       a lease's commit came too late (they come back)
//! leased USER TEXTS        the victim holds these, uncommitted
//! ```
//!
//! Texts are `pPROC.SEQ`: every message names its sender and its place in
//! that sender's order.
//!
//! One child, the victim, has a 1 s lease timeout. After a second of the
//! same work it leases users' messages until it holds some, logs them and
//! `holding`, and sleeps: the parent kills it with SIGKILL there. The three
//! survivors (lease timeout 30 s, so their own leases never expire) keep
//! working for 2 s more, past the victim's lease timeout, then stop and
//! drain everything that is left.
//!
//! The parent checks: every acknowledged message is delivered exactly once
//! in total (lost 0, duplicates 0); a failed send at most once; nothing
//! appears that was never sent; the victim's leased messages come back and
//! are delivered by the survivors; each user gets each sender's messages in
//! send order, within a drain and across drains (one drain is before
//! another if it ended before the other started), except messages that
//! were in a lease that ended uncommitted (the victim's, or an expired
//! one): those come back later, after newer ones, by design.
#![cfg(feature = "redis")]

mod common;

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use async_messages::{Error, Level, Message, MessageStore};
use common::child::{Running, command, say};
use common::redis::RedisServer;
use common::{Rng, seed_from_env};

const PROCESSES: usize = 4;
/// The process killed while holding leases (the last one).
const VICTIM: usize = PROCESSES - 1;
const USERS: u64 = 20;
/// Recipients of the bulk sends who never drain (untracked).
const FILLERS: std::ops::Range<u64> = 10_000..10_300;
const VICTIM_LEASE_TIMEOUT: Duration = Duration::from_secs(1);
const SURVIVOR_LEASE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the survivors keep working after the kill.
const AFTER_KILL: Duration = Duration::from_secs(2);
const NAMESPACE: &str = "four-processes";

const URL_ENV: &str = "ASYNC_MESSAGES_WORKER_URL";
const DIR_ENV: &str = "ASYNC_MESSAGES_WORKER_DIR";
const PROC_ENV: &str = "ASYNC_MESSAGES_WORKER_PROC";
const SEED_ENV: &str = "ASYNC_MESSAGES_WORKER_SEED";

/// The signal files the parent creates in the shared directory.
const GO: &str = "go";
const STOP: &str = "stop";
const DRAIN: &str = "drain";

// ---------------------------------------------------------------- the child

/// One line per acknowledged call, each written whole with one `write`
/// (no buffer to lose): the kernel has it before the next call starts.
struct Log(File);

impl Log {
    fn line(&mut self, line: &str) {
        self.0
            .write_all(format!("{line}\n").as_bytes())
            .expect("write the log");
    }
}

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn texts(messages: &[Message]) -> String {
    let texts: Vec<&str> = messages.iter().map(Message::text).collect();
    texts.join(" ")
}

fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "no {} after 120 s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A child's work: its store handle, its log, its sends.
struct Worker {
    store: MessageStore,
    log: Log,
    proc: usize,
    seq: u64,
    rng: Rng,
}

impl Worker {
    fn text(&mut self) -> String {
        self.seq += 1;
        format!("p{}.{}", self.proc, self.seq)
    }

    fn send(&mut self, users: &[u64]) {
        let text = self.text();
        let list: Vec<String> = users.iter().map(u64::to_string).collect();
        let result = match users {
            [user] => self.store.info(*user, &text).map(|_| ()),
            _ => self
                .store
                .message_users(users.iter().copied(), &text, Level::Info)
                .map(|_| ()),
        };
        self.log_send(result, &text, &list.join(","));
    }

    fn bulk(&mut self) {
        let text = self.text();
        let result = self
            .store
            .message_users((0..USERS).chain(FILLERS), &text, Level::Warning)
            .map(|_| ());
        self.log_send(result, &text, "all");
    }

    fn log_send(&mut self, result: async_messages::Result<()>, text: &str, users: &str) {
        match result {
            Ok(()) => self.log.line(&format!("sent {text} {users}")),
            Err(error) => self.log.line(&format!("unsure {text} {users} {error}")),
        }
    }

    fn get_messages(&mut self, user: u64) {
        let start = nanos();
        match self.store.get_messages(user) {
            Ok(got) => self.log_got(start, user, &got),
            // Which messages is unknown: the order check skips this user.
            Err(Error::LeaseExpired { .. }) => self.log.line(&format!("drain-expired {user}")),
            Err(error) => self.log.line(&format!("drain-failed {user} {error}")),
        }
    }

    fn lease_and_commit(&mut self, user: u64) {
        let start = nanos();
        let lease = match self.store.lease_messages(user) {
            Ok(lease) => lease,
            Err(error) => return self.log.line(&format!("drain-failed {user} {error}")),
        };
        let leased = lease.messages().to_vec();
        match lease.commit() {
            Ok(got) => {
                assert_eq!(got, leased, "a commit returns what was leased");
                self.log_got(start, user, &got);
            }
            Err(Error::LeaseExpired { .. }) => {
                self.log.line(&format!("expired {user} {}", texts(&leased)));
            }
            Err(error) => self.log.line(&format!("drain-failed {user} {error}")),
        }
    }

    fn log_got(&mut self, start: u128, user: u64, got: &[Message]) {
        if !got.is_empty() {
            let end = nanos();
            self.log
                .line(&format!("got {start} {end} {user} {}", texts(got)));
        }
    }

    /// One random call. The victim drains only by lease and commit, so
    /// that an expired lease (1 s) names its messages.
    fn step(&mut self) {
        let roll = self.rng.below(100);
        let user = self.rng.below(USERS);
        if roll < 45 {
            self.send(&[user]);
        } else if roll < 55 {
            let mut users: Vec<u64> = (0..2 + self.rng.below(3))
                .map(|_| self.rng.below(USERS))
                .collect();
            users.sort_unstable();
            users.dedup();
            self.send(&users);
        } else if roll < 57 {
            self.bulk();
        } else if roll < 78 && self.proc != VICTIM {
            self.get_messages(user);
        } else {
            self.lease_and_commit(user);
        }
        // Leave the other processes (and the other tests) some CPU.
        std::thread::sleep(Duration::from_micros(self.rng.below(1500)));
    }
}

/// The child process. Does nothing unless started by the test below.
#[test]
#[ignore = "child process of four_processes_twenty_users_one_killed_while_holding_leases"]
fn worker_child() {
    let (Ok(url), Ok(dir), Ok(proc), Ok(seed)) = (
        std::env::var(URL_ENV),
        std::env::var(DIR_ENV),
        std::env::var(PROC_ENV),
        std::env::var(SEED_ENV),
    ) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let proc: usize = proc.parse().expect("process number");
    let seed: u64 = seed.parse().expect("seed");
    let victim = proc == VICTIM;
    let store = MessageStore::builder()
        .redis(&url)
        .namespace(NAMESPACE)
        .lease_timeout(if victim {
            VICTIM_LEASE_TIMEOUT
        } else {
            SURVIVOR_LEASE_TIMEOUT
        })
        .open()
        .expect("open the store");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("p{proc}.log")))
        .expect("open the log");
    let mut worker = Worker {
        store,
        log: Log(log),
        proc,
        seq: 0,
        rng: Rng::new(seed ^ (proc as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
    };
    // The harness printed "test worker_child ... " without a newline.
    say("\nready".to_owned());
    wait_for_file(&dir.join(GO));

    if victim {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(1) {
            worker.step();
        }
        hold_leases(&mut worker);
        std::thread::sleep(Duration::from_secs(120));
        panic!("the victim was not killed");
    }

    while !dir.join(STOP).exists() {
        worker.step();
    }
    worker.log.line("stopped");
    wait_for_file(&dir.join(DRAIN));
    // Everything left, the victim's leased messages included (they are
    // hidden until its lease times out): until no user has anything.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for user in 0..USERS {
            worker.get_messages(user);
        }
        let left: usize = (0..USERS)
            .map(|user| worker.store.count(user).expect("count"))
            .sum();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} messages left after 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    worker.log.line("done");
}

/// The victim leases users' messages until it holds at least a few
/// (sending one first, so that there is something to lease), logs them,
/// and keeps the leases (never dropped: the kill comes first).
fn hold_leases(worker: &mut Worker) {
    let mut held = Vec::new();
    let mut messages = 0;
    for user in (0..USERS).cycle().take(200) {
        if messages >= 8 {
            break;
        }
        worker.send(&[user]);
        match worker.store.lease_messages(user) {
            Ok(lease) if !lease.messages().is_empty() => {
                worker
                    .log
                    .line(&format!("leased {user} {}", texts(lease.messages())));
                messages += lease.messages().len();
                held.push(lease);
            }
            Ok(_) => {}
            Err(error) => worker.log.line(&format!("lease-failed {user} {error}")),
        }
    }
    worker.log.line(&format!("holding {messages}"));
    std::mem::forget(held);
}

// --------------------------------------------------------------- the parent

/// A drain's delivery, from a log.
struct Got {
    proc: usize,
    /// Its line in the process's log: that process's drains are in this order.
    line: usize,
    start: u128,
    end: u128,
    user: u64,
    texts: Vec<String>,
}

impl Got {
    /// Certainly finished before `other` started.
    fn before(&self, other: &Got) -> bool {
        if self.proc == other.proc {
            self.line < other.line
        } else {
            self.end < other.start
        }
    }
}

/// What the logs say.
#[derive(Default)]
struct History {
    /// Acknowledged sends: text → users.
    sent: HashMap<String, Vec<u64>>,
    /// Failed sends (in doubt): text → users.
    unsure: HashMap<String, Vec<u64>>,
    got: Vec<Got>,
    /// (user, text) held by the victim when it was killed.
    leased: HashSet<(u64, String)>,
    /// (user, text) of leases whose commit came too late.
    expired: HashSet<(u64, String)>,
    /// Users with a drain that expired without naming its messages.
    unknown_order: HashSet<u64>,
    /// Drains that failed for another reason.
    failed_drains: Vec<String>,
}

fn users(list: &str) -> Vec<u64> {
    if list == "all" {
        return (0..USERS).collect();
    }
    list.split(',')
        .map(|u| u.parse().expect("a user"))
        .collect()
}

fn read_logs(dir: &Path) -> History {
    let mut history = History::default();
    for proc in 0..PROCESSES {
        let text = std::fs::read_to_string(dir.join(format!("p{proc}.log"))).unwrap_or_default();
        for (line_no, line) in text.lines().enumerate() {
            let words: Vec<&str> = line.split(' ').collect();
            let user = || words[1].parse::<u64>().expect("a user");
            let pairs = |from: usize| -> Vec<(u64, String)> {
                words[from..]
                    .iter()
                    .map(|t| (user(), (*t).to_owned()))
                    .collect()
            };
            match words[0] {
                "sent" => {
                    history.sent.insert(words[1].to_owned(), users(words[2]));
                }
                "unsure" => {
                    history.unsure.insert(words[1].to_owned(), users(words[2]));
                }
                "got" => history.got.push(Got {
                    proc,
                    line: line_no,
                    start: words[1].parse().expect("start"),
                    end: words[2].parse().expect("end"),
                    user: words[3].parse().expect("user"),
                    texts: words[4..].iter().map(|t| (*t).to_owned()).collect(),
                }),
                "leased" => history.leased.extend(pairs(2)),
                "expired" => history.expired.extend(pairs(2)),
                "drain-expired" => {
                    history.unknown_order.insert(user());
                }
                "drain-failed" | "lease-failed" => {
                    history.failed_drains.push(format!("p{proc}: {line}"))
                }
                "stopped" | "done" | "holding" => {}
                other => panic!("p{proc}: unknown log line {other:?}: {line}"),
            }
        }
    }
    history
}

/// `(sender, seq)` of a text `pPROC.SEQ`.
fn sender(text: &str) -> (usize, u64) {
    let (proc, seq) = text
        .strip_prefix('p')
        .and_then(|rest| rest.split_once('.'))
        .unwrap_or_else(|| panic!("not a text of this test: {text:?}"));
    (
        proc.parse().expect("sender"),
        seq.parse().expect("sequence number"),
    )
}

/// Waits until `done` holds, or fails after 60 s with `what`.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not after 60 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn log_has(dir: &Path, proc: usize, prefix: &str) -> bool {
    std::fs::read_to_string(dir.join(format!("p{proc}.log")))
        .is_ok_and(|log| log.lines().any(|line| line.starts_with(prefix)))
}

#[test]
fn four_processes_twenty_users_one_killed_while_holding_leases() {
    let Some(server) = RedisServer::start_or_skip() else {
        return;
    };
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("async-messages-workers-")
        .tempdir()
        .expect("temp dir");
    let seed = seed_from_env(SEED_ENV);
    let mut children: Vec<Running> = (0..PROCESSES)
        .map(|proc| {
            let mut child = command("worker_child");
            child
                .env(URL_ENV, server.url())
                .env(DIR_ENV, dir.path())
                .env(PROC_ENV, proc.to_string())
                .env(SEED_ENV, seed.to_string());
            Running::spawn(child)
        })
        .collect();
    for (proc, child) in children.iter_mut().enumerate() {
        assert!(
            child.wait_for(|line| line == "ready").is_ok(),
            "p{proc} did not start: {:?}",
            child.seen
        );
    }
    File::create(dir.path().join(GO)).expect("go");

    wait_until("the victim holds leases", || {
        if let Ok(Some(status)) = children[VICTIM].child.try_wait() {
            panic!("the victim exited early: {status}");
        }
        log_has(dir.path(), VICTIM, "holding")
    });
    let (status, _) = children[VICTIM].kill();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "killed by SIGKILL"
    );
    std::thread::sleep(AFTER_KILL);
    File::create(dir.path().join(STOP)).expect("stop");
    wait_until("the survivors stop", || {
        (0..VICTIM).all(|proc| log_has(dir.path(), proc, "stopped"))
    });
    File::create(dir.path().join(DRAIN)).expect("drain");
    for (proc, child) in children.iter_mut().enumerate().take(VICTIM) {
        let mut status = None;
        wait_until("a survivor drains and exits", || {
            status = child.child.try_wait().expect("try_wait");
            status.is_some()
        });
        assert!(
            status.is_some_and(|s| s.success()),
            "p{proc} failed ({status:?}): {:?}",
            child.seen
        );
    }

    let history = read_logs(dir.path());
    check(&history, seed);

    // Nothing is left, as another process sees it.
    let store = MessageStore::builder()
        .redis(server.url())
        .namespace(NAMESPACE)
        .open()
        .expect("open");
    for user in 0..USERS {
        assert_eq!(store.count(user).expect("count"), 0, "user {user}");
    }
    println!("(seed {seed}; {:.1?} in all)", started.elapsed());
}

fn check(history: &History, seed: u64) {
    // How often each (user, text) was delivered, and by which process.
    let mut delivered: HashMap<(u64, &str), Vec<usize>> = HashMap::new();
    for got in &history.got {
        for text in &got.texts {
            delivered
                .entry((got.user, text.as_str()))
                .or_default()
                .push(got.proc);
        }
    }
    let acked: Vec<(u64, &str)> = history
        .sent
        .iter()
        .flat_map(|(text, users)| users.iter().map(move |u| (*u, text.as_str())))
        .collect();
    let lost: Vec<&(u64, &str)> = acked
        .iter()
        .filter(|pair| !delivered.contains_key(*pair))
        .collect();
    let duplicates: Vec<(&(u64, &str), &Vec<usize>)> =
        delivered.iter().filter(|(_, by)| by.len() > 1).collect();
    let unknown: Vec<&(u64, &str)> = delivered
        .keys()
        .filter(|(user, text)| {
            let sent_to = |map: &HashMap<String, Vec<u64>>| {
                map.get(*text).is_some_and(|users| users.contains(user))
            };
            !sent_to(&history.sent) && !sent_to(&history.unsure)
        })
        .collect();
    let unsure_delivered = history
        .unsure
        .iter()
        .flat_map(|(text, users)| users.iter().map(move |u| (*u, text.as_str())))
        .filter(|pair| delivered.contains_key(pair))
        .count();
    // The victim's leased messages came back: delivered by a survivor.
    let not_back: Vec<&(u64, String)> = history
        .leased
        .iter()
        .filter(|(user, text)| {
            delivered
                .get(&(*user, text.as_str()))
                .is_none_or(|by| by.contains(&VICTIM))
        })
        .collect();

    // Order: within a drain, and across drains that did not overlap.
    let mut violations = Vec::new();
    for got in &history.got {
        let mut last: HashMap<usize, u64> = HashMap::new();
        for text in &got.texts {
            let (from, seq) = sender(text);
            if let Some(prev) = last.insert(from, seq)
                && prev >= seq
            {
                violations.push(format!(
                    "user {}: {text} after p{from}.{prev} in one drain",
                    got.user
                ));
            }
        }
    }
    let exempt = |user: u64, text: &str| {
        let pair = (user, text.to_owned());
        history.leased.contains(&pair)
            || history.expired.contains(&pair)
            || history.unknown_order.contains(&user)
    };
    // (user, sender) → [(seq, drain)]
    let mut by_sender: HashMap<(u64, usize), Vec<(u64, &Got)>> = HashMap::new();
    for got in &history.got {
        for text in &got.texts {
            if exempt(got.user, text) {
                continue;
            }
            let (from, seq) = sender(text);
            by_sender
                .entry((got.user, from))
                .or_default()
                .push((seq, got));
        }
    }
    for ((user, from), mut list) in by_sender {
        list.sort_by_key(|(seq, _)| *seq);
        for (i, (early, early_got)) in list.iter().enumerate() {
            for (late, late_got) in &list[i + 1..] {
                if late_got.before(early_got) {
                    violations.push(format!(
                        "user {user}: p{from}.{late} was delivered (p{}) before p{from}.{early} (p{})",
                        late_got.proc, early_got.proc
                    ));
                }
            }
        }
    }

    let deliveries: usize = history.got.iter().map(|got| got.texts.len()).sum();
    println!(
        "several processes on one Redis: {} messages ({} acknowledged sends, {} deliveries), \
         {PROCESSES} processes, 1 kill (holding {} leased messages, {} back and delivered by others), \
         lost {}, duplicates {}, in doubt {} sends ({} delivered), expired leases {}, \
         failed drains {}, order violations {}",
        acked.len(),
        history.sent.len(),
        deliveries,
        history.leased.len(),
        history.leased.len() - not_back.len(),
        lost.len(),
        duplicates.len(),
        history.unsure.len(),
        unsure_delivered,
        history.expired.len(),
        history.failed_drains.len(),
        violations.len(),
    );
    let context = format!("(seed {seed}: rerun with {SEED_ENV}={seed})");
    assert!(lost.is_empty(), "lost {context}: {lost:?}");
    assert!(
        duplicates.is_empty(),
        "delivered twice {context}: {duplicates:?}"
    );
    assert!(unknown.is_empty(), "never sent {context}: {unknown:?}");
    assert!(
        !history.leased.is_empty(),
        "the victim held no messages when it was killed {context}"
    );
    assert!(
        not_back.is_empty(),
        "leased by the killed process and not delivered by another {context}: {not_back:?}"
    );
    assert!(
        violations.is_empty(),
        "out of order {context}: {violations:?}"
    );
    assert!(
        history.failed_drains.is_empty(),
        "drains failed {context}: {:?}",
        history.failed_drains
    );
}
