//! Power loss: a child process sends and drains durably
//! (`Durability::Immediate`) on a file system that forgets everything not
//! synced (`tests/common/powercut.rs`); the parent cuts the power at a
//! random moment, mounts what was synced, reopens the store and checks the
//! promises of README's "Durability" for a power loss:
//!
//! - every acknowledged send is still queued or was delivered by an
//!   acknowledged drain (only a drain cut off by the cut may have taken
//!   messages of its user without acknowledging them: the crate says so);
//! - nothing is delivered twice and an acknowledged drain never comes back;
//! - nothing appears that was never sent.
//!
//! `SIGKILL` alone keeps everything the process handed to the kernel, so
//! only a test like this one sees a missing `fdatasync`. Controls: the same
//! check catches a store with `Durability::Periodic(1 h)` and one whose
//! `fdatasync` is switched off (`Builder::unsafe_skip_fdatasync_for_tests`).
//! Further tests cover a brand-new store (the directory `fsync`), the
//! clean-close mark file, and how many fsyncs 64 concurrent senders cost.
//!
//! The child is this test binary re-invoked with `--exact power_child
//! --ignored`. It prints an intent line before each call and an
//! acknowledgement after it:
//!
//! ```text
//! send T SEQ USER          sent T SEQ ID
//! bulk T SEQ USER,USER..   bulked T SEQ ID     (up to 5 users, or `all`: 300,
//!                                              one bulk record)
//! draining T USER          drained T USER ID:TEXT ID:TEXT ...
//! closing (waits for a line on stdin, then drops the store)   closed
//! ```
//!
//! Texts are `cCYCLE.tTHREAD.sSEQ`, so every message names its sender.
//! Without FUSE (no `/dev/fuse`, or the mount fails) the tests print
//! `SKIPPED` and pass, unless `CI` is set: then they fail.

mod common;
#[path = "common/powercut.rs"]
mod powercut;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_messages::{Builder, Durability, Error, Level, MessageStore, UserId};
use common::child::{self, Key, Running, Stopped, parse_text, say};
use common::{Rng, seed_from_env};
use powercut::PowerCutFs;

const DIR_ENV: &str = "ASYNC_MESSAGES_POWER_DIR";
const CYCLE_ENV: &str = "ASYNC_MESSAGES_POWER_CYCLE";
const SEED_ENV: &str = "ASYNC_MESSAGES_POWER_SEED";
const MODE_ENV: &str = "ASYNC_MESSAGES_POWER_MODE";
const ROLE_ENV: &str = "ASYNC_MESSAGES_POWER_ROLE";
const CYCLES_ENV: &str = "ASYNC_MESSAGES_POWER_CYCLES";
/// Sending and draining threads in the child.
const THREADS: usize = 3;
/// Users that get single and small bulk sends and are drained by the child.
const USERS: usize = 16;
/// A large bulk send goes to all of these: above the 256 recipients from
/// which a bulk send is one record. Those past `USERS` get nothing else and
/// are drained only by the parent.
const ALL_USERS: usize = 300;

/// Integer and string users.
fn user(index: usize) -> UserId {
    if index.is_multiple_of(2) {
        UserId::Int(index as u64)
    } else {
        UserId::from(format!("user-{index}"))
    }
}

/// The thread that drains a user: one each, so its drains are in print order.
fn owner(user: usize) -> usize {
    user % THREADS
}

/// Mounts the power-cut file system, or says why not: a skip without `CI`,
/// a failure with it (`common::missing_prerequisite`).
fn mount_or_skip() -> Option<PowerCutFs> {
    match PowerCutFs::mount() {
        Ok(fs) => Some(fs),
        Err(reason) => {
            common::missing_prerequisite(&format!(
                "{reason}; this test needs FUSE (/dev/fuse, and root or fusermount3 from the fuse3 package)"
            ));
            None
        }
    }
}

/// How the child's store keeps (or breaks) its durability promise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The default, `Durability::Immediate`.
    Immediate,
    /// Control: `Durability::Periodic(1 h)`.
    Periodic,
    /// Control: `Durability::Immediate` without the `fdatasync`.
    NoFdatasync,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Immediate => "immediate",
            Mode::Periodic => "periodic",
            Mode::NoFdatasync => "no-fdatasync",
        }
    }

    fn parse(name: &str) -> Option<Mode> {
        [Mode::Immediate, Mode::Periodic, Mode::NoFdatasync]
            .into_iter()
            .find(|mode| mode.name() == name)
    }

    fn builder(self, path: &Path) -> Builder {
        let builder = MessageStore::builder().path(path);
        match self {
            Mode::Immediate => builder,
            Mode::Periodic => builder.durability(Durability::Periodic(Duration::from_secs(3600))),
            Mode::NoFdatasync => builder.unsafe_skip_fdatasync_for_tests(true),
        }
    }
}

// ---------------------------------------------------------------- the child

/// Waits until killed.
fn park() -> ! {
    loop {
        std::thread::park();
    }
}

/// The child process. Does nothing unless started by a test of this file
/// (so `cargo test -- --ignored` passes over it).
#[test]
#[ignore = "child process of the power-loss tests"]
fn power_child() {
    let (Ok(dir), Ok(cycle), Ok(seed), Ok(mode), Ok(role)) = (
        std::env::var(DIR_ENV),
        std::env::var(CYCLE_ENV),
        std::env::var(SEED_ENV),
        std::env::var(MODE_ENV),
        std::env::var(ROLE_ENV),
    ) else {
        return;
    };
    let cycle: u64 = cycle.parse().expect("cycle number");
    let seed: u64 = seed.parse().expect("seed");
    let mode = Mode::parse(&mode).expect("mode");
    // After the cut every file operation fails: report it and wait for the kill.
    let fail = |what: &str, error: async_messages::Error| -> ! {
        say(format!("error {what}: {error}"));
        park()
    };
    let store = mode
        .builder(Path::new(&dir))
        .open()
        .unwrap_or_else(|e| fail("open", e));
    // The test harness has printed "test power_child ... " without a newline.
    say("\nready".to_owned());
    if role == "close" {
        for seq in 1..=5 {
            say(format!("send 0 {seq} 0"));
            match store.message_user(user(0), format!("c{cycle}.t0.s{seq}"), Level::Info) {
                Ok(id) => say(format!("sent 0 {seq} {}", id.expect("stored").get())),
                Err(e) => fail("send", e),
            }
        }
        say("closing".to_owned());
        let mut go = String::new();
        std::io::stdin().read_line(&mut go).expect("read stdin");
        drop(store);
        say("closed".to_owned());
        park();
    }
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let store = store.clone();
            let fail = &fail;
            scope.spawn(move || {
                let mut rng = Rng::new(seed ^ (thread as u64 + 1).wrapping_mul(0x9e37_79b9));
                let mut seq = 0_u64;
                loop {
                    let roll = rng.below(1000);
                    if roll < 600 {
                        seq += 1;
                        let to = rng.below(USERS as u64) as usize;
                        say(format!("send {thread} {seq} {to}"));
                        let text = child::text(cycle, thread, seq);
                        match store.message_user(user(to), text, Level::Info) {
                            Ok(id) => {
                                say(format!("sent {thread} {seq} {}", id.expect("stored").get()))
                            }
                            Err(e) => fail("send", e),
                        }
                    } else if roll < 702 {
                        seq += 1;
                        let to: Vec<usize> = if roll < 700 {
                            let to = rng.some_of(USERS, 5);
                            let list: Vec<String> = to.iter().map(usize::to_string).collect();
                            say(format!("bulk {thread} {seq} {}", list.join(",")));
                            to
                        } else {
                            say(format!("bulk {thread} {seq} all"));
                            (0..ALL_USERS).collect()
                        };
                        let text = child::text(cycle, thread, seq);
                        match store.message_users(to.iter().map(|u| user(*u)), text, Level::Info) {
                            Ok(sent) => say(format!(
                                "bulked {thread} {seq} {}",
                                sent.id().expect("stored").get()
                            )),
                            Err(e) => fail("bulk send", e),
                        }
                    } else {
                        let mine: Vec<usize> = (0..USERS).filter(|u| owner(*u) == thread).collect();
                        let from = mine[rng.below(mine.len() as u64) as usize];
                        say(format!("draining {thread} {from}"));
                        match store.get_messages(user(from)) {
                            Ok(messages) => say(child::drained_line(thread, from, &messages)),
                            Err(e) => fail("drain", e),
                        }
                    }
                }
            });
        }
    });
}

/// A running child, with its output read on a thread; killed when dropped.
struct ChildProcess {
    running: Running,
    stdin: Option<ChildStdin>,
    /// Its standard error (sled's threads panic on the cut's `EIO`): shown
    /// only when the child fails.
    stderr: std::sync::Arc<Mutex<Vec<u8>>>,
}

impl ChildProcess {
    fn spawn(path: &Path, cycle: u64, seed: u64, mode: Mode, role: &str) -> ChildProcess {
        let mut command = child::command("power_child");
        command
            .env(DIR_ENV, path)
            .env(CYCLE_ENV, cycle.to_string())
            .env(SEED_ENV, seed.to_string())
            .env(MODE_ENV, mode.name())
            .env(ROLE_ENV, role)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped());
        let mut running = Running::spawn(command);
        let stderr = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut pipe = running.child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buffer = [0; 4096];
            while let Ok(n @ 1..) = std::io::Read::read(&mut pipe, &mut buffer) {
                sink.lock()
                    .expect("stderr lock")
                    .extend_from_slice(&buffer[..n]);
            }
        });
        ChildProcess {
            stdin: running.child.stdin.take(),
            running,
            stderr,
        }
    }

    /// The complete lines read so far.
    fn seen(&self) -> &[String] {
        &self.running.seen
    }

    /// Waits for a line that `want` accepts; panics if the child fails,
    /// exits or takes over a minute.
    fn wait_for(&mut self, what: &str, want: impl Fn(&str) -> bool) {
        let waited = self
            .running
            .wait_for(|line| line.starts_with("error") || want(line));
        match waited {
            Ok(()) => assert!(
                !self.seen().last().is_some_and(|l| l.starts_with("error")),
                "the child failed before the cut: {}",
                self.tail()
            ),
            Err(Stopped::Timeout) => panic!("no {what} from the child in 60 s: {}", self.tail()),
            Err(Stopped::Exited(status)) => {
                panic!("the child exited with {status}: {}", self.tail())
            }
            Err(Stopped::Closed) => panic!("the child closed its output: {}", self.tail()),
        }
    }

    /// Moves the lines read so far into `seen`.
    fn poll(&mut self) {
        self.running.poll();
    }

    fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("piped stdin");
        writeln!(stdin, "{line}").expect("write to the child");
        stdin.flush().expect("flush the child's stdin");
    }

    /// SIGKILL; returns every complete line the child printed.
    fn kill(&mut self) -> Vec<String> {
        self.running.kill().1
    }

    /// The last lines of its output and of its standard error.
    fn tail(&self) -> String {
        let stderr =
            String::from_utf8_lossy(&self.stderr.lock().expect("stderr lock")).into_owned();
        let stderr: Vec<&str> = stderr.lines().collect();
        format!(
            "output {:?}, stderr {:?}",
            child::tail(self.seen()),
            &stderr[stderr.len().saturating_sub(20)..]
        )
    }
}

// --------------------------------------------------------------- the parent

/// What the child set out to send.
struct Intent {
    users: Vec<usize>,
    acked: bool,
}

/// One cycle's output, parsed.
#[derive(Default)]
struct Output {
    ready: bool,
    closed: bool,
    intents: BTreeMap<Key, Intent>,
    /// Acknowledged drains per user, in order (empty ones included).
    drains: HashMap<usize, Vec<Vec<Key>>>,
    /// Users whose drain was cut off: it may or may not have happened.
    pending: HashSet<usize>,
    errors: Vec<String>,
}

fn parse_output(cycle: u64, lines: &[String]) -> Output {
    let mut out = Output::default();
    let mut draining: HashMap<usize, bool> = HashMap::new();
    for line in lines {
        let words: Vec<&str> = line.split(' ').collect();
        let num = |i: usize| -> u64 {
            words
                .get(i)
                .and_then(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("bad line {line:?}"))
        };
        match words[0] {
            "ready" => out.ready = true,
            "closed" => out.closed = true,
            "send" | "bulk" => {
                let users = match words.get(3) {
                    Some(&"all") => (0..ALL_USERS).collect(),
                    Some(list) => list
                        .split(',')
                        .map(|u| u.parse().unwrap_or_else(|_| panic!("bad line {line:?}")))
                        .collect(),
                    None => panic!("bad line {line:?}"),
                };
                let key = (cycle, num(1), num(2));
                out.intents.insert(
                    key,
                    Intent {
                        users,
                        acked: false,
                    },
                );
            }
            "sent" | "bulked" => {
                let key = (cycle, num(1), num(2));
                out.intents
                    .get_mut(&key)
                    .unwrap_or_else(|| panic!("acknowledgement without intent: {line:?}"))
                    .acked = true;
            }
            "draining" => {
                draining.insert(num(2) as usize, true);
            }
            "drained" => {
                let from = num(2) as usize;
                draining.insert(from, false);
                let got = words[3..]
                    .iter()
                    .map(|word| {
                        let (_, text) = word.split_once(':').expect("ID:TEXT");
                        parse_text(text).unwrap_or_else(|| panic!("unknown text {text:?}"))
                    })
                    .collect();
                out.drains.entry(from).or_default().push(got);
            }
            "error" => out.errors.push(line.clone()),
            _ => {} // the test harness's own lines
        }
    }
    out.pending = draining
        .into_iter()
        .filter_map(|(u, pending)| pending.then_some(u))
        .collect();
    out
}

/// Broken promises found by one check.
#[derive(Default)]
struct Broken {
    lost: Vec<String>,
    came_back: Vec<String>,
    twice: Vec<String>,
    never_sent: Vec<String>,
}

impl Broken {
    fn is_empty(&self) -> bool {
        self.lost.is_empty()
            && self.came_back.is_empty()
            && self.twice.is_empty()
            && self.never_sent.is_empty()
    }

    fn describe(&self) -> String {
        let list = |what: &str, items: &[String]| {
            format!(
                "{} {what}{}",
                items.len(),
                items
                    .first()
                    .map_or(String::new(), |first| format!(" (first: {first})"))
            )
        };
        [
            list("acknowledged messages lost", &self.lost),
            list("acknowledged drains came back", &self.came_back),
            list("delivered twice", &self.twice),
            list("never sent", &self.never_sent),
        ]
        .join(", ")
    }
}

/// The parent's knowledge across cycles, and the figures.
#[derive(Default)]
struct World {
    /// Each user's queue as read at the end of the last cycle.
    queues: Vec<Vec<Key>>,
    /// Every (message, user) ever delivered.
    delivered: HashSet<(Key, usize)>,
    /// Every intent, all cycles: who each message was for.
    intents: HashMap<Key, Vec<usize>>,
    cycles: u64,
    cut_in_start_up: u64,
    acked_sends: u64,
    /// Of which large bulk sends (one bulk record).
    acked_large_bulks: u64,
    acked_drains: u64,
    unacked_survived: u64,
    unacked_lost: u64,
    taken_by_cut_drains: u64,
}

impl World {
    fn new() -> World {
        World {
            queues: vec![Vec::new(); ALL_USERS],
            ..World::default()
        }
    }

    /// Compares what the store holds after the cut (`found`, each user's
    /// queue) with what the child acknowledged.
    fn check(&mut self, out: &Output, found: &[Vec<Key>]) -> Broken {
        for (key, intent) in &out.intents {
            self.intents.insert(*key, intent.users.clone());
        }
        let mut broken = Broken::default();
        let mut seen_anywhere = HashSet::new();
        for (u, queue) in found.iter().enumerate() {
            let sent_to_u = |key: &Key| {
                self.intents
                    .get(key)
                    .is_some_and(|users| users.contains(&u))
            };
            let drained: Vec<Key> = out
                .drains
                .get(&u)
                .into_iter()
                .flatten()
                .flatten()
                .copied()
                .collect();
            let mut here = HashSet::new();
            for key in &drained {
                if !sent_to_u(key) {
                    broken
                        .never_sent
                        .push(format!("{key:?} drained by user {u}"));
                }
                if self.delivered.contains(&(*key, u)) || !here.insert(*key) {
                    broken.twice.push(format!("{key:?} to user {u}"));
                }
            }
            let mut queued = HashSet::new();
            for key in queue {
                if !sent_to_u(key) {
                    broken
                        .never_sent
                        .push(format!("{key:?} queued for user {u}"));
                }
                if here.contains(key) || self.delivered.contains(&(*key, u)) {
                    broken.came_back.push(format!("{key:?} of user {u}"));
                } else if !queued.insert(*key) {
                    broken
                        .twice
                        .push(format!("{key:?} queued twice for user {u}"));
                }
            }
            here.extend(queued);
            let acked_now = out
                .intents
                .iter()
                .filter(|(_, i)| i.acked && i.users.contains(&u))
                .map(|(key, _)| *key);
            for missing in self.queues[u].iter().copied().chain(acked_now) {
                if here.contains(&missing) {
                    continue;
                }
                if out.pending.contains(&u) {
                    self.taken_by_cut_drains += 1;
                } else {
                    broken.lost.push(format!("{missing:?} to user {u}"));
                }
            }
            seen_anywhere.extend(here.iter().copied());
            self.delivered.extend(drained.iter().map(|key| (*key, u)));
            self.queues[u] = queue.clone();
        }
        for (key, intent) in &out.intents {
            match (intent.acked, seen_anywhere.contains(key)) {
                (true, _) => {
                    self.acked_sends += 1;
                    self.acked_large_bulks += u64::from(intent.users.len() == ALL_USERS);
                }
                (false, true) => self.unacked_survived += 1,
                (false, false) => self.unacked_lost += 1,
            }
        }
        self.acked_drains += child::non_empty_drains(&out.drains);
        broken
    }
}

/// Each user's queue, as keys.
fn read_queues(store: &MessageStore) -> Vec<Vec<Key>> {
    (0..ALL_USERS)
        .map(|u| {
            store
                .peek(user(u))
                .expect("peek after the cut")
                .iter()
                .map(|m| {
                    parse_text(m.text()).unwrap_or_else(|| panic!("unknown text {:?}", m.text()))
                })
                .collect()
        })
        .collect()
}

/// When the parent cuts the power.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CutAt {
    /// At a random moment: one cycle in six during start-up and recovery,
    /// the others 20–270 ms into sending and draining.
    Random,
    /// As soon as the first send is acknowledged.
    FirstAck,
}

/// Runs `cycles` cycles of child, cut, check on the store at `path`;
/// `Err` describes the first broken promise.
fn power_loss_loop(
    fs: &mut PowerCutFs,
    path: &Path,
    cycles: u64,
    mode: Mode,
    cut_at: CutAt,
    world: &mut World,
) -> Result<(), String> {
    let seed = seed_from_env(SEED_ENV);
    println!(
        "power loss: {cycles} cycles, {} store, seed {seed} (set {SEED_ENV} to replay)",
        mode.name()
    );
    let mut rng = Rng::new(seed);
    let mut ready_ms = 100;
    for _ in 0..cycles {
        let cycle = world.cycles;
        world.cycles += 1;
        let mut child = ChildProcess::spawn(path, cycle, rng.next(), mode, "work");
        let spawned = Instant::now();
        match cut_at {
            CutAt::Random if rng.below(6) == 0 => {
                std::thread::sleep(Duration::from_millis(rng.below(ready_ms)));
            }
            CutAt::Random => {
                child.wait_for("ready", |line| line == "ready");
                ready_ms = spawned.elapsed().as_millis() as u64;
                std::thread::sleep(Duration::from_millis(20 + rng.below(250)));
            }
            CutAt::FirstAck => child.wait_for("acknowledged send", |line| {
                line.starts_with("sent ") || line.starts_with("bulked ")
            }),
        }
        child.poll();
        if let Some(error) = child.seen().iter().find(|l| l.starts_with("error")) {
            panic!(
                "cycle {cycle}: the child failed before the cut: {error}; {}",
                child.tail()
            );
        }
        fs.freeze();
        let lines = child.kill();
        drop(child);
        let out = parse_output(cycle, &lines);
        if !out.errors.is_empty() {
            assert!(
                fs.counts().refused > 0,
                "cycle {cycle}: the child failed, but not because of the cut: {:?}",
                out.errors
            );
        }
        if !out.ready {
            world.cut_in_start_up += 1;
        }
        fs.power_cut();

        let store = match MessageStore::open(path) {
            Ok(store) => store,
            Err(error) => {
                return Err(format!(
                    "seed {seed}, cycle {cycle}: the store does not open after the cut: {error}"
                ));
            }
        };
        let found = read_queues(&store);
        let broken = world.check(&out, &found);
        if !broken.is_empty() {
            return Err(format!("seed {seed}, cycle {cycle}: {}", broken.describe()));
        }
        // Now and then the parent drains a few users: those must not come
        // back either. It drains the users only large bulk sends reach at
        // every cycle, so that bulk records are taken by all and removed.
        for u in 0..ALL_USERS {
            if u >= USERS || rng.below(4) == 0 {
                let got: Vec<Key> = store
                    .get_messages(user(u))
                    .expect("drain after the cut")
                    .iter()
                    .map(|m| parse_text(m.text()).expect("known text"))
                    .collect();
                assert_eq!(got, world.queues[u], "a drain returns what peek showed");
                world.delivered.extend(got.into_iter().map(|key| (key, u)));
                world.queues[u].clear();
            }
        }
    }
    Ok(())
}

/// The main loop, with figures.
fn run_power_loss(cycles: u64) {
    let Some(mut fs) = mount_or_skip() else {
        return;
    };
    let path = fs.path().join("store");
    let mut world = World::new();
    let started = Instant::now();
    let outcome = power_loss_loop(
        &mut fs,
        &path,
        cycles,
        Mode::Immediate,
        CutAt::Random,
        &mut world,
    );
    let counts = fs.counts();
    let queued: usize = world.queues.iter().map(Vec::len).sum();
    println!(
        "power loss: {} cycles in {:.1} s ({} cut during start-up); {} acknowledged sends ({} of them to {ALL_USERS} users: one bulk record), {} acknowledged drains (non-empty), {} messages delivered, {queued} still queued, lost 0; unacknowledged sends: {} survived, {} lost; {} messages taken by drains cut off by the cut; {} file syncs, {} directory syncs",
        world.cycles,
        started.elapsed().as_secs_f64(),
        world.cut_in_start_up,
        world.acked_sends,
        world.acked_large_bulks,
        world.acked_drains,
        world.delivered.len(),
        world.unacked_survived,
        world.unacked_lost,
        world.taken_by_cut_drains,
        counts.file_syncs(),
        counts.fsyncdir,
    );
    if let Err(problem) = outcome {
        panic!("{problem}");
    }
    assert!(
        world.acked_sends > cycles,
        "the child did too little to prove anything"
    );
    assert!(world.acked_drains > 0, "no acknowledged drain to check");
    assert!(world.acked_large_bulks > 0, "no large bulk send to check");
}

#[test]
fn power_loss_keeps_every_acknowledged_send_and_drain() {
    run_power_loss(24);
}

/// `cargo test --all-features --release --test power_loss -- --ignored --nocapture power_loss_long`
#[test]
#[ignore = "long run: 200 cycles"]
fn power_loss_long() {
    let cycles = std::env::var(CYCLES_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    run_power_loss(cycles);
}

/// Runs the loop against a store that breaks the promise; it must be caught.
fn expect_caught(mode: Mode) {
    let Some(mut fs) = mount_or_skip() else {
        return;
    };
    let path = fs.path().join("store");
    let mut world = World::new();
    // Two honest cycles first, so that there are durable messages whose
    // acknowledged drains can come back.
    if let Err(problem) = power_loss_loop(
        &mut fs,
        &path,
        2,
        Mode::Immediate,
        CutAt::Random,
        &mut world,
    ) {
        panic!("{problem}");
    }
    let outcome = power_loss_loop(&mut fs, &path, 8, mode, CutAt::Random, &mut world);
    let problem = outcome.expect_err("a store that does not sync passed the power-loss check");
    println!("caught, as it should be ({} store): {problem}", mode.name());
    assert!(
        problem.contains("lost (first") || problem.contains("came back (first"),
        "{problem}"
    );
}

/// Control: `Durability::Periodic(1 h)` loses acknowledged sends.
#[test]
fn the_check_catches_a_store_that_syncs_once_an_hour() {
    expect_caught(Mode::Periodic);
}

/// Control: without its `fdatasync` the store's acknowledged writes are
/// only in the kernel's hands (sled's own flush ends in `sync_file_range`).
#[test]
fn the_check_catches_a_store_without_fdatasync() {
    expect_caught(Mode::NoFdatasync);
}

/// A store created on the mount keeps the first sends it acknowledges: the
/// cut comes as soon as one is acknowledged. Without the directory fsyncs
/// the store's files (or its directory) would be gone.
#[test]
fn a_brand_new_store_keeps_its_first_acknowledged_sends() {
    let Some(mut fs) = mount_or_skip() else {
        return;
    };
    let mut acked = 0;
    for store in 0..4 {
        let path = fs.path().join(format!("new-{store}"));
        let mut world = World::new();
        if let Err(problem) = power_loss_loop(
            &mut fs,
            &path,
            1,
            Mode::Immediate,
            CutAt::FirstAck,
            &mut world,
        ) {
            panic!("{problem}");
        }
        acked += world.acked_sends;
    }
    println!(
        "brand-new stores: 4 cut after their first acknowledged send, {acked} acknowledged sends kept"
    );
    assert!(acked >= 4);
}

/// What cutting the power at every point of a clean close showed.
#[derive(Default)]
struct CloseCuts {
    /// Cut points: after 0, 1, 2, … changes of the close, then after it.
    points: u64,
    acked_sends: u64,
    /// Cut points after which acknowledged messages were missing, and how many.
    lost_points: u64,
    lost_messages: u64,
    /// Cut points after which the store refused to open with `DataLoss`.
    data_loss_points: u64,
    first_problem: Option<String>,
}

/// Cuts the power at every point of a clean close (after 0, 1, 2, …
/// changes: the store's fdatasync; the mark's temporary file created,
/// written, fsynced and renamed; the directory fsync; sled's own fsync as it
/// closes), then once after the close finished.
/// After each cut the store must open (no `Error::DataLoss` from the
/// clean-close mark over records that are there) and hold every
/// acknowledged send. Problems are counted, not fatal: after a `DataLoss`
/// the mark is deleted (accepting the loss) and the loop goes on.
fn cuts_during_close(fs: &mut PowerCutFs, mode: Mode) -> CloseCuts {
    let path = fs.path().join("store");
    let mut cuts = CloseCuts::default();
    let problem = |cuts: &mut CloseCuts, what: String| {
        cuts.first_problem.get_or_insert(what);
    };
    // What the store must hold: acknowledged, or seen after an earlier cut.
    let mut expected: HashSet<Key> = HashSet::new();
    for cut_after in 0..200_u64 {
        let mut child = ChildProcess::spawn(&path, cut_after, 1, mode, "close");
        child.wait_for("closing", |line| line == "closing");
        fs.freeze_after(cut_after);
        child.send_line("go");
        // Until the close is done or the file system froze on the way.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut closed = false;
        while !fs.is_frozen() && !closed {
            assert!(Instant::now() < deadline, "the close took over 30 s");
            std::thread::sleep(Duration::from_millis(1));
            child.poll();
            closed = child.seen().iter().any(|line| line == "closed");
        }
        // sled's threads may still write for a moment after the close returned.
        std::thread::sleep(Duration::from_millis(20));
        let finished = closed && !fs.is_frozen();
        fs.freeze();
        let lines = child.kill();
        drop(child);
        let out = parse_output(cut_after, &lines);
        let acked = out.intents.iter().filter(|(_, i)| i.acked);
        cuts.acked_sends += acked.clone().count() as u64;
        expected.extend(acked.map(|(key, _)| *key));
        fs.power_cut();
        cuts.points += 1;
        let store = match MessageStore::open(&path) {
            Ok(store) => store,
            Err(e @ Error::DataLoss { .. }) => {
                cuts.data_loss_points += 1;
                problem(
                    &mut cuts,
                    format!("cut after {cut_after} changes of the close: {e}"),
                );
                let Error::DataLoss { mark, .. } = e else {
                    unreachable!()
                };
                std::fs::remove_file(mark).expect("delete the clean-close mark");
                MessageStore::open(&path).expect("open after accepting the loss")
            }
            Err(e) => {
                panic!("cut after {cut_after} changes of the close: the store does not open: {e}")
            }
        };
        let queue = read_queues(&store).swap_remove(0);
        let found: HashSet<Key> = queue.iter().copied().collect();
        assert_eq!(
            found.len(),
            queue.len(),
            "a message is queued twice: {queue:?}"
        );
        let lost = expected.difference(&found).count() as u64;
        if lost > 0 {
            cuts.lost_points += 1;
            cuts.lost_messages += lost;
            problem(
                &mut cuts,
                format!(
                    "cut after {cut_after} changes of the close: {lost} acknowledged messages lost"
                ),
            );
        }
        expected = found;
        // The parent's own clean close writes the mark again: the next
        // child's open reads and removes it.
        drop(store);
        if finished {
            return cuts;
        }
    }
    panic!("the close never finished within 200 changes");
}

#[test]
fn a_cut_during_or_after_a_clean_close_loses_nothing_and_reports_no_data_loss() {
    let Some(mut fs) = mount_or_skip() else {
        return;
    };
    let cuts = cuts_during_close(&mut fs, Mode::Immediate);
    println!(
        "clean close: cut at {} points (each change of the close, then after it); {} acknowledged sends; lost {}, DataLoss {}",
        cuts.points, cuts.acked_sends, cuts.lost_messages, cuts.data_loss_points
    );
    if let Some(problem) = cuts.first_problem {
        panic!("{problem}");
    }
    assert!(
        cuts.points >= 5,
        "the close made too few changes to cut between them"
    );
}

/// Control: a store without `fdatasync` writes its clean-close mark (which
/// syncs itself) over records that are not on disk: cuts must show lost
/// messages, and the mark must turn some into `DataLoss`.
#[test]
fn the_close_check_catches_a_store_without_fdatasync() {
    let Some(mut fs) = mount_or_skip() else {
        return;
    };
    let cuts = cuts_during_close(&mut fs, Mode::NoFdatasync);
    println!(
        "caught, as it should be (no-fdatasync store): cut at {} points; lost messages after {} of them ({} in all), DataLoss after {}; first: {:?}",
        cuts.points,
        cuts.lost_points,
        cuts.lost_messages,
        cuts.data_loss_points,
        cuts.first_problem
    );
    assert!(
        cuts.lost_points > 0,
        "a store without fdatasync lost nothing"
    );
    assert!(cuts.data_loss_points > 0, "no cut showed DataLoss");
}

/// 64 threads sending durably at once share fsyncs (group commit); one
/// thread sending alone needs one per send, which shows that the count sees
/// every send's fsync.
#[test]
fn sixty_four_concurrent_durable_senders_share_fsyncs() {
    let Some(fs) = mount_or_skip() else {
        return;
    };
    let store = MessageStore::open(fs.path().join("store")).expect("open");
    let syncs = || fs.counts().file_syncs();

    let alone = 50;
    let before = syncs();
    for i in 0..alone {
        store
            .message_user(1_u64, format!("alone {i}"), Level::Info)
            .expect("send");
    }
    let alone_syncs = syncs() - before;
    assert!(
        alone_syncs >= alone,
        "{alone} sends one at a time made only {alone_syncs} fsyncs: the count misses some"
    );

    let (writers, each) = (64_u64, 20_u64);
    let before = syncs();
    std::thread::scope(|scope| {
        for writer in 0..writers {
            let store = &store;
            scope.spawn(move || {
                for i in 0..each {
                    store
                        .message_user(writer, format!("w{writer}.{i}"), Level::Info)
                        .expect("send");
                }
            });
        }
    });
    let sends = writers * each;
    let shared = syncs() - before;
    println!(
        "fsyncs: one sender alone {alone_syncs} for {alone} sends ({:.2} per send); {writers} concurrent senders {shared} for {sends} sends ({:.3} per send)",
        alone_syncs as f64 / alone as f64,
        shared as f64 / sends as f64
    );
    assert!(
        shared * 4 <= sends,
        "{sends} concurrent durable sends made {shared} fsyncs: they do not share them"
    );
    drop(store);
}

/// The file system itself: unsynced writes, and new names in an unsynced
/// directory, are gone after a cut; synced ones stay. (This is what makes
/// the tests above able to fail.)
#[test]
fn the_test_file_system_forgets_what_was_not_synced() {
    let Some(mut fs) = mount_or_skip() else {
        return;
    };
    let root = fs.path().to_path_buf();
    let sync_dir = |dir: &Path| {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .expect("sync dir")
    };
    let write = |path: &PathBuf, text: &str, sync: bool| {
        let mut file = std::fs::File::create(path).expect("create");
        file.write_all(text.as_bytes()).expect("write");
        if sync {
            file.sync_data().expect("fdatasync");
        }
    };
    let kept = root.join("kept");
    write(&kept, "synced", true);
    std::fs::create_dir(root.join("dir")).expect("mkdir");
    sync_dir(&root);
    // Synced data, then an unsynced overwrite.
    write(&kept, "not synced", false);
    // Synced data, but its directory entry never synced.
    let orphan = root.join("dir").join("orphan");
    write(&orphan, "synced", true);
    // A rename that was not synced.
    std::fs::rename(&kept, root.join("renamed")).expect("rename");
    let before = fs.counts();
    assert_eq!((before.fdatasync, before.fsyncdir), (2, 1));
    assert_eq!(
        std::fs::read_to_string(root.join("renamed")).expect("read"),
        "not synced"
    );

    fs.power_cut();
    assert_eq!(
        std::fs::read_to_string(&kept).expect("read after the cut"),
        "synced"
    );
    assert!(
        !root.join("renamed").exists(),
        "an unsynced rename survived"
    );
    assert!(root.join("dir").is_dir(), "a synced mkdir is gone");
    assert!(!orphan.exists(), "a file in an unsynced directory survived");

    // Synced all the way: it stays.
    write(&orphan, "synced", true);
    sync_dir(&root.join("dir"));
    fs.power_cut();
    assert_eq!(std::fs::read_to_string(&orphan).expect("read"), "synced");
}
