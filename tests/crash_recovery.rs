//! Crash loop: a child process sends durable messages (the default
//! `Durability::Immediate`) and drains some, printing every acknowledgement;
//! the parent kills it with SIGKILL at a random moment, reopens the store and
//! checks the promises of the crate docs' "When data reaches disk":
//!
//! - every acknowledged send is still queued or was delivered by an
//!   acknowledged drain, or was taken by a drain the kill cut off, and then
//!   only as that drain can take it: the drain reads the user's whole queue
//!   at once (inserts hold the same lock stripe) and removes in id order,
//!   and sled keeps a prefix of its log, so a message may vanish only if no
//!   message with a smaller id that the drain must have read is still
//!   queued (one queued before the cycle, acknowledged before the drain
//!   started, or acknowledged before the vanished one was sent), and a
//!   lease's commit takes nothing sent after the lease was taken;
//! - nothing is delivered twice and an acknowledged drain never comes back;
//! - each user's messages keep each sender's order;
//! - a bulk send is there for all its recipients or for none (but for what
//!   a cut-off drain may take, by the rule above);
//! - message ids are never reused across restarts;
//! - nothing appears that was never sent.
//!
//! Each of these checks has a control below (`the_check_catches_*`,
//! `the_check_allows_only_what_a_cut_off_drain_can_remove`): the check run
//! on made-up histories that break it. Drains that return nothing are not
//! counted as acknowledged drains in the figures.
//!
//! The child is this test binary re-invoked with `--exact crash_child
//! --ignored` and the store's path in an environment variable. It prints an
//! intent line before each call and an acknowledgement after it:
//!
//! ```text
//! send T SEQ USER          sent T SEQ ID
//! bulk T SEQ USER,USER..   bulked T SEQ ID
//! draining T USER          drained T USER ID:TEXT ID:TEXT ...
//! leasing T USER, then committing T USER (drained ... as above) or released T USER
//! ```
//!
//! Texts are `cCYCLE.tTHREAD.sSEQ`, so every message names its sender.
//!
//! One send in fifty is a *big* bulk send (`big T SEQ` before its `bulk`
//! line): to every tracked user and to 20,000 more users (`BIG_USERS`) who
//! never drain. It is stored as one shared record, and the kill sometimes
//! lands inside it. The parent checks it like any bulk send for the tracked
//! users, and checks a different untracked user each cycle: it holds
//! exactly the big sends that the tracked users hold or were given.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use async_messages::{Durability, Level, MessageStore, Result, UserId};
use common::child::{self, Key, Running, Stopped, parse_text, say};
use common::{Rng, TestDir, seed_from_env};

const DIR_ENV: &str = "ASYNC_MESSAGES_CRASH_DIR";
const CYCLE_ENV: &str = "ASYNC_MESSAGES_CRASH_CYCLE";
const SEED_ENV: &str = "ASYNC_MESSAGES_CRASH_SEED";
const LAX_ENV: &str = "ASYNC_MESSAGES_CRASH_LAX";
/// Sending and draining threads in the child.
const THREADS: usize = 3;

/// The users: integers and strings, including the tricky ones.
fn user(index: usize) -> UserId {
    const STRINGS: [&str; 12] = [
        "",
        "a",
        "ab",
        "a\0b",
        "émilie",
        "ann",
        "bob",
        "7",
        "\u{1F600}",
        " ",
        "a\0",
        "longer-name",
    ];
    const INTS: [u64; 12] = [
        0,
        1,
        2,
        7,
        42,
        255,
        256,
        65_536,
        1 << 40,
        u64::MAX - 1,
        u64::MAX,
        99,
    ];
    if index < INTS.len() {
        UserId::Int(INTS[index])
    } else {
        UserId::from(STRINGS[index - INTS.len()])
    }
}
const USERS: usize = 24;
/// The untracked recipients of big bulk sends.
const BIG_USERS: std::ops::Range<u64> = 10_000_000..10_020_000;

/// The thread that drains a user: each user has one, so its drains are in
/// print order.
fn owner(user: usize) -> usize {
    user % THREADS
}

// ---------------------------------------------------------------- the child

/// The child process: runs until killed. Does nothing unless started by
/// the crash loop (so `cargo test -- --ignored` passes over it).
#[test]
#[ignore = "child process of the crash loop"]
fn crash_child() {
    let (Ok(dir), Ok(cycle), Ok(seed)) = (
        std::env::var(DIR_ENV),
        std::env::var(CYCLE_ENV),
        std::env::var(SEED_ENV),
    ) else {
        return;
    };
    let cycle: u64 = cycle.parse().expect("cycle number");
    let seed: u64 = seed.parse().expect("seed");
    // A store that does not keep its durability promise, to show that this
    // test catches one (see `the_check_catches_lost_acknowledged_writes`).
    let mut builder = MessageStore::builder().path(&dir);
    if std::env::var(LAX_ENV).is_ok_and(|v| v == "1") {
        builder = builder.durability(Durability::Periodic(Duration::from_secs(3600)));
    }
    let store = match builder.open() {
        Ok(store) => store,
        Err(error) => {
            say(format!("error open: {error}"));
            std::process::exit(3);
        }
    };
    // The test harness has printed "test crash_child ... " without a newline.
    say("\nready".to_owned());
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let store = store.clone();
            scope.spawn(move || {
                let mut rng = Rng::new(seed ^ (thread as u64 + 1).wrapping_mul(0x9e37_79b9));
                let started = Instant::now();
                let mut seq = 0_u64;
                // A safety cap: the parent kills long before this.
                while started.elapsed() < Duration::from_secs(60) {
                    let roll = rng.below(100);
                    let result = if roll < 55 {
                        seq += 1;
                        let to = rng.below(USERS as u64) as usize;
                        say(format!("send {thread} {seq} {to}"));
                        store
                            .message_user(user(to), child::text(cycle, thread, seq), Level::Info)
                            .map(|id| {
                                say(format!("sent {thread} {seq} {}", id.expect("stored").get()))
                            })
                    } else if roll < 65 {
                        seq += 1;
                        // One send in four of these (2 % of calls) is big.
                        let big = roll < 57;
                        let to = if big {
                            (0..USERS).collect()
                        } else {
                            rng.some_of(USERS, 6)
                        };
                        let list: Vec<String> = to.iter().map(usize::to_string).collect();
                        if big {
                            say(format!("big {thread} {seq}"));
                        }
                        say(format!("bulk {thread} {seq} {}", list.join(",")));
                        let untracked = if big { BIG_USERS } else { 0..0 };
                        store
                            .message_users(
                                to.iter()
                                    .map(|u| user(*u))
                                    .chain(untracked.map(UserId::Int)),
                                child::text(cycle, thread, seq),
                                Level::Info,
                            )
                            .map(|sent| {
                                say(format!(
                                    "bulked {thread} {seq} {}",
                                    sent.id().expect("stored").get()
                                ))
                            })
                    } else {
                        let mine: Vec<usize> = (0..USERS).filter(|u| owner(*u) == thread).collect();
                        let from = mine[rng.below(mine.len() as u64) as usize];
                        let show = |messages: &[async_messages::Message]| {
                            say(child::drained_line(thread, from, messages))
                        };
                        if rng.below(3) == 0 {
                            // A lease hides the messages but removes nothing:
                            // killed before the commit, they must all be there.
                            say(format!("leasing {thread} {from}"));
                            match store.lease_messages(user(from)) {
                                Ok(lease) => {
                                    std::thread::sleep(Duration::from_millis(rng.below(3)));
                                    if rng.below(4) == 0 {
                                        lease.release();
                                        say(format!("released {thread} {from}"));
                                        Ok(())
                                    } else {
                                        say(format!("committing {thread} {from}"));
                                        lease.commit().map(|messages| show(&messages))
                                    }
                                }
                                Err(error) => Err(error),
                            }
                        } else {
                            say(format!("draining {thread} {from}"));
                            store
                                .get_messages(user(from))
                                .map(|messages| show(&messages))
                        }
                    };
                    if let Err(error) = result {
                        say(format!("error {thread}: {error}"));
                        std::process::exit(3);
                    }
                }
            });
        }
    });
}

// --------------------------------------------------------------- the parent

/// What the child set out to send.
#[derive(Debug)]
struct Intent {
    users: Vec<usize>,
    bulk: bool,
    /// Where the intent line is in the output.
    line: usize,
    /// The acknowledged id and where the acknowledgement is, if the send
    /// returned before the kill.
    acked: Option<u64>,
    ack_line: Option<usize>,
}

/// A drain (or a lease's commit) that the kill cut off: it may have removed
/// a prefix, in key order, of the records it read, and nothing else.
#[derive(Debug, Clone, Copy)]
struct CutDrain {
    /// The line printed before the call: the drain read the queue after it.
    started: usize,
    /// For a lease's commit, the `committing` line: the lease read the queue
    /// before it, so nothing sent after it can be among what it removes.
    read_before: Option<usize>,
}

/// One cycle's output, parsed.
#[derive(Default, Debug)]
struct Output {
    ready: bool,
    intents: BTreeMap<Key, Intent>,
    /// Acknowledged drains per user, in order: (id, message) pairs.
    drains: HashMap<usize, Vec<Vec<(u64, Key)>>>,
    /// Users whose drain was cut off: it may or may not have happened.
    pending: HashMap<usize, CutDrain>,
    /// The big bulk sends (also to `BIG_USERS`).
    big: HashSet<Key>,
}

fn parse_output(cycle: u64, lines: &[String]) -> std::result::Result<Output, String> {
    let mut out = Output::default();
    let mut leases: HashMap<usize, usize> = HashMap::new();
    for (at, line) in lines.iter().enumerate() {
        let words: Vec<&str> = line.split(' ').collect();
        let num = |i: usize| -> std::result::Result<u64, String> {
            words
                .get(i)
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| format!("bad line {line:?}"))
        };
        match words[0] {
            "ready" => out.ready = true,
            "big" => {
                out.big.insert((cycle, num(1)?, num(2)?));
            }
            "send" | "bulk" => {
                let users = if words[0] == "send" {
                    vec![num(3)? as usize]
                } else {
                    words
                        .get(3)
                        .ok_or("bad bulk line")?
                        .split(',')
                        .map(|u| u.parse().map_err(|_| format!("bad line {line:?}")))
                        .collect::<std::result::Result<_, _>>()?
                };
                let key = (cycle, num(1)?, num(2)?);
                out.intents.insert(
                    key,
                    Intent {
                        users,
                        bulk: words[0] == "bulk",
                        line: at,
                        acked: None,
                        ack_line: None,
                    },
                );
            }
            "sent" | "bulked" => {
                let key = (cycle, num(1)?, num(2)?);
                let intent = out
                    .intents
                    .get_mut(&key)
                    .ok_or_else(|| format!("ack without intent: {line:?}"))?;
                intent.acked = Some(num(3)?);
                intent.ack_line = Some(at);
            }
            // Leasing and releasing remove nothing; a commit removes.
            "draining" => {
                let cut = CutDrain {
                    started: at,
                    read_before: None,
                };
                out.pending.insert(num(2)? as usize, cut);
            }
            "leasing" => {
                leases.insert(num(2)? as usize, at);
            }
            "released" => {
                leases.remove(&(num(2)? as usize));
            }
            "committing" => {
                let from = num(2)? as usize;
                let started = *leases
                    .get(&from)
                    .ok_or_else(|| format!("commit without a lease: {line:?}"))?;
                let cut = CutDrain {
                    started,
                    read_before: Some(at),
                };
                out.pending.insert(from, cut);
            }
            "drained" => {
                let from = num(2)? as usize;
                out.pending.remove(&from);
                leases.remove(&from);
                let mut got = Vec::new();
                for word in &words[3..] {
                    let (id, text) = word.split_once(':').ok_or("bad drained word")?;
                    let id = id.parse().map_err(|_| "bad id")?;
                    let key = parse_text(text).ok_or_else(|| format!("unknown text {text:?}"))?;
                    got.push((id, key));
                }
                out.drains.entry(from).or_default().push(got);
            }
            "error" => return Err(format!("the child failed: {line}")),
            _ => {} // the test harness's own lines
        }
    }
    Ok(out)
}

/// The parent's knowledge across cycles.
#[derive(Default)]
struct World {
    /// Each user's queue as read at the end of the last cycle.
    queues: Vec<Vec<(u64, Key)>>,
    /// Every (message, user) ever delivered.
    delivered: HashSet<(Key, usize)>,
    /// Every intent, all cycles: who each message was for.
    intents: HashMap<Key, Vec<usize>>,
    /// The largest message id seen in earlier cycles.
    max_id_before: Option<u64>,
    // Figures.
    acked_sends: u64,
    /// Acknowledged drains that returned messages (empty ones prove nothing).
    acked_drains: u64,
    vanished_in_cut_drains: u64,
    unacked_sends_survived: u64,
    unacked_sends_lost: u64,
    killed_before_ready: u64,
    /// Every big bulk send, and the number acknowledged / cut off by the kill.
    big: HashSet<Key>,
    big_acked: u64,
    big_cut: u64,
}

impl World {
    fn new() -> World {
        World {
            queues: vec![Vec::new(); USERS],
            ..World::default()
        }
    }

    /// Why message `b` (id `id_b`) cannot have vanished from user `u`'s
    /// queue, now `queue`; `None` if it may have.
    ///
    /// Only a drain cut off by the kill removes without acknowledging, and
    /// only what it read: a drain reads the whole queue at once (inserts
    /// take the same lock stripe) and removes in key (= id) order, and
    /// sled's recovery keeps a prefix of its log, so what vanishes is the
    /// read queue's lowest ids. So `b` may vanish only if the user has a cut
    /// drain, a lease's commit only if `b` was sent before it, and no
    /// message with a smaller id that the drain must have read is still
    /// queued: one queued before the cycle, acknowledged before the drain
    /// started, or acknowledged before `b` was sent (if the drain read `b`
    /// it read that one too).
    fn cannot_vanish(
        &self,
        out: &Output,
        u: usize,
        queue: &[(u64, Key)],
        id_b: u64,
        b: Key,
    ) -> Option<String> {
        let Some(cut) = out.pending.get(&u) else {
            return Some("no drain of this user was cut off".to_owned());
        };
        let intent_b = out.intents.get(&b);
        if let (Some(read_before), Some(intent)) = (cut.read_before, intent_b)
            && intent.line > read_before
        {
            return Some(format!(
                "the cut-off commit's lease read the queue (before line {read_before}) before it was sent (line {})",
                intent.line
            ));
        }
        for (id_a, a) in queue.iter().filter(|(id_a, _)| *id_a < id_b) {
            let queued_before = self.queues[u].iter().any(|(_, k)| k == a);
            let ack_a = out.intents.get(a).and_then(|i| i.ack_line);
            let acked_before_drain = ack_a.is_some_and(|line| line < cut.started);
            let acked_before_b = ack_a
                .zip(intent_b)
                .is_some_and(|(line, intent)| line < intent.line);
            if queued_before || acked_before_drain || acked_before_b {
                return Some(format!(
                    "{a:?} (id {id_a}), which the cut-off drain read and had to remove first, is still queued"
                ));
            }
        }
        None
    }

    fn check(
        &mut self,
        cycle: u64,
        out: &Output,
        found: &[Vec<(u64, Key)>],
    ) -> std::result::Result<(), String> {
        for (key, intent) in &out.intents {
            self.intents.insert(*key, intent.users.clone());
            if out.big.contains(key) {
                self.big.insert(*key);
                if intent.acked.is_some() {
                    self.big_acked += 1;
                } else {
                    self.big_cut += 1;
                }
            }
        }
        let mut max_id = self.max_id_before;
        let mut seen_anywhere: HashMap<Key, HashSet<usize>> = HashMap::new();
        let mut ids: HashMap<Key, u64> = HashMap::new();
        for (u, queue) in found.iter().enumerate() {
            let drained: Vec<(u64, Key)> = out
                .drains
                .get(&u)
                .into_iter()
                .flatten()
                .flatten()
                .copied()
                .collect();
            let all: Vec<(u64, Key)> = drained.iter().chain(queue).copied().collect();
            let ctx = |what: String| format!("cycle {cycle}, user {u} ({:?}): {what}", user(u));
            // Nothing that was never sent to this user; nothing twice.
            let mut here = HashSet::new();
            for (id, key) in &all {
                if !self
                    .intents
                    .get(key)
                    .is_some_and(|users| users.contains(&u))
                {
                    return Err(ctx(format!("message {key:?} was never sent to this user")));
                }
                if !here.insert(*key) {
                    return Err(ctx(format!("message {key:?} is delivered or queued twice")));
                }
                if self.delivered.contains(&(*key, u)) {
                    return Err(ctx(format!(
                        "message {key:?} was delivered before and came back"
                    )));
                }
                if let Some(Some(acked)) = out.intents.get(key).map(|i| i.acked)
                    && acked != *id
                {
                    return Err(ctx(format!(
                        "message {key:?} has id {id}, acknowledged as {acked}"
                    )));
                }
                if key.0 == cycle && self.max_id_before.is_some_and(|before| *id <= before) {
                    return Err(ctx(format!(
                        "message {key:?} has id {id}, not above the ids of earlier runs (up to {:?}): an id was reused",
                        self.max_id_before
                    )));
                }
                max_id = max_id.max(Some(*id));
                seen_anywhere.entry(*key).or_default().insert(u);
                ids.insert(*key, *id);
            }
            // Order: earlier cycles first, each sender's messages in send order.
            let mut last: HashMap<(u64, u64), u64> = HashMap::new();
            for pair in all.windows(2) {
                if pair[1].1.0 < pair[0].1.0 {
                    return Err(ctx(format!(
                        "{:?} of an earlier run comes after {:?}: {all:?}",
                        pair[1].1, pair[0].1
                    )));
                }
            }
            for (_, (c, t, s)) in &all {
                if let Some(before) = last.insert((*c, *t), *s)
                    && before >= *s
                {
                    return Err(ctx(format!(
                        "sender c{c}.t{t}: s{s} was sent before s{before} but comes after it: {all:?}"
                    )));
                }
            }
            if queue.windows(2).any(|w| w[0].0 >= w[1].0) {
                return Err(ctx(format!("the queue is not in id order: {queue:?}")));
            }
            // Everything expected is there, unless a cut-off drain took it.
            let expected = self.queues[u].iter().copied().chain(
                out.intents
                    .iter()
                    .filter(|(_, i)| i.users.contains(&u))
                    .filter_map(|(key, i)| Some((i.acked?, *key))),
            );
            for (id, missing) in expected.filter(|(_, key)| !here.contains(key)) {
                if let Some(why) = self.cannot_vanish(out, u, queue, id, missing) {
                    return Err(ctx(format!(
                        "acknowledged message {missing:?} (id {id}) is lost: {why}"
                    )));
                }
                self.vanished_in_cut_drains += 1;
            }
        }
        for (u, queue) in found.iter().enumerate() {
            for (_, key) in out.drains.get(&u).into_iter().flatten().flatten() {
                self.delivered.insert((*key, u));
            }
            // Bulk sends: all recipients or none, except what a cut-off
            // drain may have taken (by the same rule as above).
            for (key, intent) in &out.intents {
                let Some(reached) = seen_anywhere.get(key) else {
                    continue;
                };
                if !intent.bulk || !intent.users.contains(&u) || reached.contains(&u) {
                    continue;
                }
                if let Some(why) = self.cannot_vanish(out, u, queue, ids[key], *key) {
                    return Err(format!(
                        "cycle {cycle}: bulk send {key:?} to {:?} reached {reached:?} but not user {u}: {why}",
                        intent.users,
                    ));
                }
            }
        }
        for intent in out.intents.values() {
            if intent.acked.is_some() {
                self.acked_sends += 1;
            }
        }
        for (key, intent) in &out.intents {
            if intent.acked.is_none() {
                if seen_anywhere.contains_key(key) {
                    self.unacked_sends_survived += 1;
                } else {
                    self.unacked_sends_lost += 1;
                }
            }
        }
        self.acked_drains += child::non_empty_drains(&out.drains);
        self.queues = found.to_vec();
        self.max_id_before = max_id;
        Ok(())
    }
}

/// Runs the loop; `Err` describes the first broken promise.
fn crash_loop(cycles: u64, lax: bool) -> Result<std::result::Result<(), String>> {
    let seed = seed_from_env(SEED_ENV);
    println!("crash loop: {cycles} cycles, seed {seed} (set {SEED_ENV} to replay)");
    let mut rng = Rng::new(seed);
    let dir = TestDir::new();
    let path = dir.store_path();
    let mut world = World::new();
    let started = Instant::now();
    // How long the child took to open the store, for kills during start-up.
    let mut ready_ms = 50;
    for cycle in 0..cycles {
        let child_seed = rng.next();
        let mut command = child::command("crash_child");
        command
            .env(DIR_ENV, &path)
            .env(CYCLE_ENV, cycle.to_string())
            .env(SEED_ENV, child_seed.to_string())
            .env(LAX_ENV, if lax { "1" } else { "" });
        let mut child = Running::spawn(command);
        // One cycle in six is killed at a random moment of start-up and
        // recovery; the others while sending and draining.
        let spawned = Instant::now();
        if rng.below(6) == 0 {
            std::thread::sleep(Duration::from_millis(rng.below(ready_ms.max(2))));
        } else {
            match child.wait_for(|line| line == "ready") {
                Ok(()) => {}
                Err(Stopped::Timeout) => panic!("cycle {cycle}: the child never opened the store"),
                Err(Stopped::Exited(status)) => panic!(
                    "cycle {cycle}: the child exited early with {status}: {:?}",
                    child.seen
                ),
                Err(Stopped::Closed) => panic!(
                    "cycle {cycle}: the child closed its output: {:?}",
                    child::tail(&child.seen)
                ),
            }
            ready_ms = spawned.elapsed().as_millis() as u64;
            std::thread::sleep(Duration::from_millis(20 + rng.below(250)));
        }
        let (status, lines) = child.kill();
        drop(child);
        {
            use std::os::unix::process::ExitStatusExt;
            if status.signal() != Some(9) {
                panic!(
                    "cycle {cycle}: the child was not killed but ended with {status}: {lines:?}"
                );
            }
        }
        let out = parse_output(cycle, &lines).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        if !out.ready {
            world.killed_before_ready += 1;
        }

        let store = MessageStore::open(&path)?;
        let mut found = Vec::with_capacity(USERS);
        for u in 0..USERS {
            let queue: Vec<(u64, Key)> = store
                .peek(user(u))?
                .iter()
                .map(|m| {
                    let key = parse_text(m.text())
                        .unwrap_or_else(|| panic!("unknown text {:?}", m.text()));
                    (m.id().get(), key)
                })
                .collect();
            found.push(queue);
        }
        if let Err(problem) = world.check(cycle, &out, &found) {
            return Ok(Err(format!("seed {seed}: {problem}")));
        }
        // An untracked recipient holds exactly the big sends that exist.
        let present: BTreeSet<Key> = world
            .big
            .iter()
            .filter(|key| {
                found.iter().flatten().any(|(_, k)| k == *key)
                    || (0..USERS).any(|u| world.delivered.contains(&(**key, u)))
            })
            .copied()
            .collect();
        let untracked = BIG_USERS.start + (cycle * 7_919) % (BIG_USERS.end - BIG_USERS.start);
        let held: BTreeSet<Key> = store
            .peek(untracked)?
            .iter()
            .map(|m| parse_text(m.text()).expect("known text"))
            .collect();
        if held != present {
            return Ok(Err(format!(
                "seed {seed}, cycle {cycle}: untracked user {untracked} holds big sends {held:?}, but the tracked users show {present:?}: a bulk send is not all or nothing"
            )));
        }
        // Now and then the parent drains a few users: those must not come back either.
        for u in 0..USERS {
            if rng.below(4) == 0 {
                let got: Vec<(u64, Key)> = store
                    .get_messages(user(u))?
                    .iter()
                    .map(|m| (m.id().get(), parse_text(m.text()).expect("known text")))
                    .collect();
                assert_eq!(
                    got, world.queues[u],
                    "seed {seed}: a drain returns what peek showed"
                );
                for (_, key) in got {
                    world.delivered.insert((key, u));
                }
                world.queues[u].clear();
            }
        }
        drop(store);
    }
    let queued: usize = world.queues.iter().map(Vec::len).sum();
    println!(
        "crash loop: {cycles} cycles in {:.1} s ({} killed during start-up); {} acknowledged sends, {} acknowledged drains, {} messages delivered, {queued} still queued; unacknowledged sends: {} survived, {} lost; {} messages taken by drains cut off by the kill; big bulk sends to {} users: {} acknowledged, {} cut off by the kill",
        started.elapsed().as_secs_f64(),
        world.killed_before_ready,
        world.acked_sends,
        world.acked_drains,
        world.delivered.len(),
        world.unacked_sends_survived,
        world.unacked_sends_lost,
        world.vanished_in_cut_drains,
        BIG_USERS.end - BIG_USERS.start + USERS as u64,
        world.big_acked,
        world.big_cut,
    );
    assert!(
        world.acked_sends > cycles,
        "the child did too little to prove anything"
    );
    assert!(world.acked_drains > 0);
    Ok(Ok(()))
}

#[test]
fn crash_loop_keeps_every_acknowledged_send_and_drain() -> Result<()> {
    crash_loop(24, false)?.map_err(|problem| panic!("{problem}"))
}

/// `cargo test --all-features --release --test crash_recovery -- --ignored --nocapture crash_loop_long`
#[test]
#[ignore = "long run: 200 cycles"]
fn crash_loop_long() -> Result<()> {
    let cycles = std::env::var("ASYNC_MESSAGES_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    crash_loop(cycles, false)?.map_err(|problem| panic!("{problem}"))
}

/// The check can fail: a child whose store only flushes once an hour
/// (`Durability::Periodic`) loses acknowledged sends and brings back
/// acknowledged drains when killed, and the loop must notice.
#[test]
fn the_check_catches_lost_acknowledged_writes() -> Result<()> {
    let outcome = crash_loop(4, true)?;
    let problem = outcome.expect_err("a store without fsync passed the crash check");
    println!("caught, as it should: {problem}");
    assert!(
        problem.contains("is lost") || problem.contains("came back") || problem.contains("twice"),
        "{problem}"
    );
    Ok(())
}

// ------------------------------------------------------------ the controls

/// A made-up cycle: the child's output, and per user its queue after the
/// reopen as (id, text) pairs.
type MadeUpCycle<'a> = (&'a str, &'a [(usize, &'a [(u64, &'a str)])]);

/// Runs the parent's check over made-up cycles: each is the child's output
/// and what the reopened store holds (user, then (id, text) in queue
/// order). Returns the world, or the first broken promise.
fn check_cycles(cycles: &[MadeUpCycle<'_>]) -> std::result::Result<World, String> {
    let mut world = World::new();
    for (cycle, (output, queues)) in cycles.iter().enumerate() {
        let lines: Vec<String> = output.lines().map(|l| l.trim().to_owned()).collect();
        let out = parse_output(cycle as u64, &lines)?;
        let mut found = vec![Vec::new(); USERS];
        for (u, queue) in *queues {
            found[*u] = queue
                .iter()
                .map(|(id, text)| (*id, parse_text(text).expect("a test text")))
                .collect();
        }
        world.check(cycle as u64, &out, &found)?;
    }
    Ok(world)
}

/// Cycle 0 of the controls: users 0 and 3 get messages; thread 0 drains
/// user 3, thread 1 drains user 1 and finds nothing.
const CYCLE_0: &str = "
    ready
    send 0 1 0
    sent 0 1 10
    send 1 1 0
    sent 1 1 11
    bulk 0 2 0,3
    bulked 0 2 12
    send 0 3 3
    sent 0 3 13
    draining 0 3
    drained 0 3 12:c0.t0.s2 13:c0.t0.s3
    draining 1 1
    drained 1 1";
const QUEUE_0: &[(u64, &str)] = &[(10, "c0.t0.s1"), (11, "c0.t1.s1"), (12, "c0.t0.s2")];

/// Asserts that the check finds `problem` in these cycles.
fn assert_caught(cycles: &[MadeUpCycle<'_>], problem: &str) {
    match check_cycles(cycles) {
        Ok(_) => panic!("the check missed a broken promise ({problem})"),
        Err(found) => assert!(
            found.contains(problem),
            "expected {problem:?}, got {found:?}"
        ),
    }
}

#[test]
fn the_check_passes_a_correct_history_and_counts_only_non_empty_drains() {
    let world = check_cycles(&[(CYCLE_0, &[(0, QUEUE_0)])]).expect("a correct history");
    assert_eq!(world.acked_sends, 4);
    assert_eq!(
        world.acked_drains, 1,
        "the empty drain of user 1 does not count"
    );
}

#[test]
fn the_check_catches_broken_order() {
    let swapped: &[(u64, &str)] = &[(12, "c0.t0.s2"), (10, "c0.t0.s1"), (11, "c0.t1.s1")];
    assert_caught(
        &[(CYCLE_0, &[(0, swapped)])],
        "was sent before s2 but comes after it",
    );
    // Ids out of order, each sender in order (sends not acknowledged).
    let ids: &[(u64, &str)] = &[(11, "c0.t0.s1"), (10, "c0.t1.s1")];
    assert_caught(
        &[("ready\nsend 0 1 0\nsend 1 1 0", &[(0, ids)])],
        "not in id order",
    );
    // A message of cycle 1 before one of cycle 0.
    let cycle_1 = "ready\nsend 0 1 0\nsent 0 1 20";
    let mixed: &[(u64, &str)] = &[
        (20, "c1.t0.s1"),
        (10, "c0.t0.s1"),
        (11, "c0.t1.s1"),
        (12, "c0.t0.s2"),
    ];
    assert_caught(
        &[(CYCLE_0, &[(0, QUEUE_0)]), (cycle_1, &[(0, mixed)])],
        "of an earlier run comes after",
    );
}

#[test]
fn the_check_catches_a_bulk_send_that_reached_only_some_users() {
    // Not acknowledged, so it may be gone, but for everyone or no one.
    let unacked = "ready\nbulk 0 1 0,5";
    assert_caught(
        &[(unacked, &[(0, &[(10, "c0.t0.s1")])])],
        "reached {0} but not user 5: no drain of this user was cut off",
    );
    // Also when user 5's drain was cut off, if user 5 still has a message
    // acknowledged before that drain with a smaller id.
    let cut = "ready\nsend 1 1 5\nsent 1 1 9\nbulk 0 1 0,5\ndraining 2 5";
    assert_caught(
        &[(cut, &[(0, &[(10, "c0.t0.s1")]), (5, &[(9, "c0.t1.s1")])])],
        "had to remove first, is still queued",
    );
    // Without that message, the cut-off drain may have taken it.
    let cut = "ready\nbulk 0 1 0,5\ndraining 2 5";
    check_cycles(&[(cut, &[(0, &[(10, "c0.t0.s1")])])]).expect("taken by the cut-off drain");
}

#[test]
fn the_check_catches_a_reused_id() {
    let cycle_1 = "ready\nsend 0 1 5\nsent 0 1 12";
    assert_caught(
        &[
            (CYCLE_0, &[(0, QUEUE_0)]),
            (cycle_1, &[(0, QUEUE_0), (5, &[(12, "c1.t0.s1")])]),
        ],
        "an id was reused",
    );
}

#[test]
fn the_check_catches_lost_doubled_returning_and_invented_messages() {
    let lost: &[(u64, &str)] = &[(10, "c0.t0.s1"), (12, "c0.t0.s2")];
    assert_caught(
        &[(CYCLE_0, &[(0, lost)])],
        "no drain of this user was cut off",
    );
    let twice: &[(u64, &str)] = &[
        (10, "c0.t0.s1"),
        (11, "c0.t1.s1"),
        (12, "c0.t0.s2"),
        (13, "c0.t0.s3"),
    ];
    assert_caught(
        &[(CYCLE_0, &[(0, QUEUE_0), (3, &twice[3..])])],
        "delivered or queued twice",
    );
    assert_caught(&[(CYCLE_0, &[(0, twice)])], "never sent to this user");
    // Drained in cycle 0, back in cycle 1.
    assert_caught(
        &[
            (CYCLE_0, &[(0, QUEUE_0)]),
            ("ready", &[(0, QUEUE_0), (3, &[(13, "c0.t0.s3")])]),
        ],
        "was delivered before and came back",
    );
}

#[test]
fn the_check_allows_only_what_a_cut_off_drain_can_remove() {
    // Thread 0 starts draining user 0 and is killed.
    let cycle_1 = "ready\ndraining 0 0";
    let rest: [(u64, &str); 3] = [(10, "c0.t0.s1"), (11, "c0.t1.s1"), (12, "c0.t0.s2")];
    // A prefix of the queue in id order may go ...
    for taken in 0..=3 {
        check_cycles(&[
            (CYCLE_0, &[(0, QUEUE_0)]),
            (cycle_1, &[(0, &rest[taken..])]),
        ])
        .unwrap_or_else(|e| panic!("the cut-off drain took {taken}: {e}"));
    }
    // ... but not a later message while an earlier one stays.
    assert_caught(
        &[
            (CYCLE_0, &[(0, QUEUE_0)]),
            (cycle_1, &[(0, &[rest[0], rest[2]])]),
        ],
        "had to remove first, is still queued",
    );

    // Sent during the drain, which took everything older: 20 was
    // acknowledged before 21 was sent, so a drain that read 21 read 20 first.
    let cycle_1 = "ready\ndraining 0 0\nsend 1 1 0\nsent 1 1 20\nsend 2 1 0\nsent 2 1 21";
    let queue: &[(u64, &str)] = &[(20, "c1.t1.s1")];
    assert_caught(
        &[(CYCLE_0, &[(0, QUEUE_0)]), (cycle_1, &[(0, queue)])],
        "had to remove first, is still queued",
    );
    // Sent at the same time, 20 may have been inserted after the drain read
    // the queue (its id came first, its insert later): 21 may go alone.
    let cycle_1 = "ready\ndraining 0 0\nsend 1 1 0\nsend 2 1 0\nsent 2 1 21\nsent 1 1 20";
    check_cycles(&[(CYCLE_0, &[(0, QUEUE_0)]), (cycle_1, &[(0, queue)])])
        .expect("20 was not acknowledged before 21 was sent");

    // A lease's commit removes only what the lease read, before `committing`.
    let cycle_1 = "ready\nleasing 0 0\ncommitting 0 0\nsend 1 1 0\nsent 1 1 20";
    assert_caught(
        &[(CYCLE_0, &[(0, QUEUE_0)]), (cycle_1, &[(0, &[])])],
        "before it was sent",
    );
    // A released lease removes nothing.
    let cycle_1 = "ready\nleasing 0 0\nreleased 0 0";
    assert_caught(
        &[(CYCLE_0, &[(0, QUEUE_0)]), (cycle_1, &[(0, &rest[1..])])],
        "no drain of this user was cut off",
    );
}
