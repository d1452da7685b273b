//! Churn soak: senders and drainers run continuously against one store
//! (default `Durability::Immediate`), while the test samples the store's
//! size on disk and the process's resident memory. Both must stay bounded:
//! drained messages' space is reused, and nothing in memory grows with the
//! number of messages that went through. And every message is accounted
//! for by identity: each one sent is delivered exactly once, to its user,
//! during the soak or by the final drain of every user.
//!
//! 10 s by default; 5 minutes in the ignored `churn_soak_long`. Both print
//! their curves (one sample per second).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_messages::{Level, Result};
use common::TestDir;

/// Users messages go to; each drainer takes a random one.
const USERS: u64 = 2000;
const SENDERS: u64 = 2;
const DRAINERS: u64 = 2;

/// The process's resident memory, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Bytes of all files under `dir` (what `du --apparent-size` says).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(std::result::Result::ok)
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_bytes(&e.path()),
                    _ => e.metadata().map_or(0, |m| m.len()),
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The user message `i` is sent to.
fn recipient(i: u64) -> u64 {
    i.wrapping_mul(7919) % USERS
}

/// Sender `s` numbers its messages `s, s + SENDERS, ...`; after message
/// `i`, if `i % BULK_EVERY == 0`, it also sends bulk message `i` to these
/// users (50, all different).
const BULK_EVERY: u64 = 500;
const BULK_USERS: u64 = 50;
fn bulk_recipients(i: u64) -> impl Iterator<Item = u64> {
    (0..BULK_USERS).map(move |k| (i + k * 31) % USERS)
}

/// Which messages were delivered, one bit per message (and per recipient
/// of a bulk message), so that checking identities costs about 1 MiB over
/// the 5-minute run and does not hide a leak in the RSS curve.
#[derive(Default)]
struct Ledger {
    single: Vec<u64>,
    bulk: Vec<u64>,
    delivered: u64,
    /// The first problems found (duplicates, wrong users, unknown texts).
    problems: Vec<String>,
}

/// Sets a bit; `false` if it was already set.
fn set_bit(bits: &mut Vec<u64>, index: u64) -> bool {
    let (word, bit) = ((index / 64) as usize, index % 64);
    if bits.len() <= word {
        bits.resize(word + 1, 0);
    }
    let was = bits[word] & (1 << bit) != 0;
    bits[word] |= 1 << bit;
    !was
}

fn bit(bits: &[u64], index: u64) -> bool {
    bits.get((index / 64) as usize)
        .is_some_and(|word| word & (1 << (index % 64)) != 0)
}

impl Ledger {
    fn problem(&mut self, problem: String) {
        if self.problems.len() < 10 {
            self.problems.push(problem);
        }
    }

    /// Records that `user` was handed `text`.
    fn deliver(&mut self, user: u64, text: &str) {
        self.delivered += 1;
        let number = |rest: &str| rest.split(' ').next().and_then(|n| n.parse::<u64>().ok());
        if let Some(i) = text.strip_prefix("report ").and_then(number) {
            if recipient(i) != user {
                self.problem(format!(
                    "message {i} was sent to user {} but delivered to user {user}",
                    recipient(i)
                ));
            } else if !set_bit(&mut self.single, i) {
                self.problem(format!("message {i} delivered twice"));
            }
        } else if let Some(i) = text.strip_prefix("bulk ").and_then(number) {
            match bulk_recipients(i).position(|u| u == user) {
                Some(k) if i % BULK_EVERY == 0 => {
                    if !set_bit(&mut self.bulk, i / BULK_EVERY * BULK_USERS + k as u64) {
                        self.problem(format!("bulk message {i} delivered twice to user {user}"));
                    }
                }
                _ => self.problem(format!(
                    "bulk message {i} delivered to user {user}, not a recipient"
                )),
            }
        } else {
            self.problem(format!("user {user} got {text:?}, which was never sent"));
        }
    }

    /// Checks that everything the senders sent (sender `s` up to, not
    /// including, `ends[s]`) was delivered, and nothing else.
    fn check_complete(&self, ends: &[u64]) -> std::result::Result<u64, String> {
        if let Some(problem) = self.problems.first() {
            return Err(format!("{problem} (and {} more)", self.problems.len() - 1));
        }
        let mut sent = 0;
        for (s, end) in ends.iter().enumerate() {
            for i in (s as u64..*end).step_by(ends.len()) {
                sent += 1;
                if !bit(&self.single, i) {
                    return Err(format!(
                        "message {i} (to user {}) was never delivered",
                        recipient(i)
                    ));
                }
                if i % BULK_EVERY == 0 {
                    for (k, user) in bulk_recipients(i).enumerate() {
                        sent += 1;
                        if !bit(&self.bulk, i / BULK_EVERY * BULK_USERS + k as u64) {
                            return Err(format!("bulk message {i} never reached user {user}"));
                        }
                    }
                }
            }
        }
        if sent != self.delivered {
            return Err(format!(
                "{sent} messages sent but {} delivered",
                self.delivered
            ));
        }
        Ok(sent)
    }
}

struct Sample {
    at: f64,
    sent: u64,
    drained: u64,
    disk: u64,
    files: u64,
    rss_kib: u64,
}

fn soak(duration: Duration) -> Result<Vec<Sample>> {
    let dir = TestDir::new();
    let store = dir.open()?;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let drained = Arc::new(AtomicU64::new(0));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (store, stop, sent) = (store.clone(), stop.clone(), sent.clone());
        // Returns the number of its first message not sent.
        senders.push(std::thread::spawn(move || -> Result<u64> {
            let mut i = s;
            while !stop.load(Ordering::Relaxed) {
                let text = format!("report {i} is ready: {}", "x".repeat((i % 200) as usize));
                store.message_user(recipient(i), text, Level::Info)?;
                sent.fetch_add(1, Ordering::Relaxed);
                // Now and then a bulk send to 50 users.
                if i % BULK_EVERY == 0 {
                    store.message_users(bulk_recipients(i), format!("bulk {i}"), Level::Info)?;
                    sent.fetch_add(BULK_USERS, Ordering::Relaxed);
                }
                i += SENDERS;
            }
            Ok(i)
        }));
    }
    let mut drainers = Vec::new();
    for d in 0..DRAINERS {
        let (store, stop, drained, ledger) =
            (store.clone(), stop.clone(), drained.clone(), ledger.clone());
        drainers.push(std::thread::spawn(move || -> Result<()> {
            let mut i = d;
            while !stop.load(Ordering::Relaxed) {
                let user = i.wrapping_mul(104_729) % USERS;
                let got = store.get_messages(user)?;
                drained.fetch_add(got.len() as u64, Ordering::Relaxed);
                let mut ledger = ledger.lock().expect("ledger");
                for message in &got {
                    ledger.deliver(user, message.text());
                }
                drop(ledger);
                i += DRAINERS;
            }
            Ok(())
        }));
    }
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut next = Duration::ZERO;
    while next <= duration {
        let wait = next.saturating_sub(started.elapsed());
        std::thread::sleep(wait);
        samples.push(Sample {
            at: started.elapsed().as_secs_f64(),
            sent: sent.load(Ordering::Relaxed),
            drained: drained.load(Ordering::Relaxed),
            disk: store.size_on_disk()?,
            files: dir_bytes(&dir.store_path()),
            rss_kib: rss_kib(),
        });
        next += Duration::from_secs(1);
    }
    stop.store(true, Ordering::Relaxed);
    let mut ends = Vec::new();
    for sender in senders {
        ends.push(sender.join().expect("sender panicked")?);
    }
    for drainer in drainers {
        drainer.join().expect("drainer panicked")?;
    }
    // Everything sent is drained or still queued: counts, then identities.
    let mut ledger = ledger.lock().expect("ledger");
    let mut queued = 0;
    for user in 0..USERS {
        let got = store.get_messages(user)?;
        queued += got.len() as u64;
        for message in &got {
            ledger.deliver(user, message.text());
        }
    }
    let (sent, drained) = (
        sent.load(Ordering::Relaxed),
        drained.load(Ordering::Relaxed),
    );
    let checked = ledger
        .check_complete(&ends)
        .unwrap_or_else(|problem| panic!("{problem}"));
    assert_eq!(checked, sent);
    assert_eq!(sent, drained + queued, "sent = drained + still queued");
    println!("all {checked} messages delivered once each, to their users");
    println!("   time      sent   drained  size_on_disk   files on disk      RSS");
    for s in &samples {
        println!(
            "{:6.1} s {:9} {:9} {:10.1} MiB {:11.1} MiB {:6.1} MiB",
            s.at,
            s.sent,
            s.drained,
            s.disk as f64 / 1048576.0,
            s.files as f64 / 1048576.0,
            s.rss_kib as f64 / 1024.0
        );
    }
    Ok(samples)
}

/// Checks the curves after the warm-up (the first `warm` samples): disk and
/// memory stay within generous but real bounds.
fn assert_bounded(samples: &[Sample], warm: usize) {
    let base = &samples[warm];
    let after = &samples[warm..];
    let max_disk = after.iter().map(|s| s.disk.max(s.files)).max().unwrap_or(0);
    let max_rss = after.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let last = samples.last().expect("samples");
    assert!(
        last.drained > 10 * USERS,
        "too little churn to prove anything: {} drained",
        last.drained
    );
    // Disk: at most 2x the warm-up size, plus 4 MiB of slack for sled's
    // segments (a store that kept drained messages grows by about 1.5 MiB/s here).
    let disk_bound = 2 * base.disk.max(base.files) + (4 << 20);
    assert!(
        max_disk <= disk_bound,
        "disk grew from {} to {} bytes (bound {disk_bound})",
        base.disk.max(base.files),
        max_disk
    );
    // Memory: at most 16 MiB above the warm-up level (sled's cache is 8 MiB).
    assert!(
        max_rss <= base.rss_kib + 16 * 1024,
        "RSS grew from {} KiB to {max_rss} KiB",
        base.rss_kib
    );
}

#[test]
fn churn_keeps_disk_and_memory_bounded() -> Result<()> {
    let samples = soak(Duration::from_secs(10))?;
    assert_bounded(&samples, 1);
    Ok(())
}

/// `cargo test --all-features --release --test churn_soak -- --ignored --nocapture churn_soak_long`
#[test]
#[ignore = "long run: 5 minutes"]
fn churn_soak_long() -> Result<()> {
    let samples = soak(Duration::from_secs(300))?;
    assert_bounded(&samples, 10);
    Ok(())
}

/// The control: the identity check catches a lost, a doubled, a misdelivered
/// and an invented message, single or bulk, where the counts could balance.
#[test]
fn the_ledger_catches_lost_doubled_and_misdelivered_messages() {
    let text = |i: u64| format!("report {i} is ready: x");
    // Sender 0 sent 0 and 2 (and bulk 0), sender 1 sent 1 and 3.
    let ends = [4, 5];
    let complete = |ledger: &mut Ledger, skip: &[u64]| {
        for i in 0..4 {
            if !skip.contains(&i) {
                ledger.deliver(recipient(i), &text(i));
            }
        }
        for user in bulk_recipients(0) {
            ledger.deliver(user, "bulk 0");
        }
    };
    let mut good = Ledger::default();
    complete(&mut good, &[]);
    assert_eq!(good.check_complete(&ends), Ok(4 + BULK_USERS));

    let mut cases: Vec<(&str, Ledger)> = Vec::new();
    // Lost and doubled: the counts balance, the identities do not.
    let mut ledger = Ledger::default();
    complete(&mut ledger, &[2]);
    ledger.deliver(recipient(3), &text(3));
    cases.push(("delivered twice", ledger));
    let mut ledger = Ledger::default();
    complete(&mut ledger, &[1]);
    cases.push(("message 1 (to user", ledger));
    let mut ledger = Ledger::default();
    complete(&mut ledger, &[1]);
    ledger.deliver(recipient(1) + 1, &text(1));
    cases.push(("delivered to user", ledger));
    let mut ledger = Ledger::default();
    complete(&mut ledger, &[]);
    ledger.deliver(recipient(7), &text(7));
    cases.push(("54 messages sent but 55 delivered", ledger));
    let mut ledger = Ledger::default();
    complete(&mut ledger, &[]);
    ledger.deliver(3, "something else");
    cases.push(("never sent", ledger));
    let mut ledger = Ledger::default();
    complete(&mut ledger, &[]);
    ledger.deliver(1, "bulk 0");
    cases.push(("not a recipient", ledger));
    let mut ledger = Ledger::default();
    complete(&mut ledger, &[]);
    ledger.deliver(0, "bulk 0");
    cases.push(("bulk message 0 delivered twice", ledger));
    let mut ledger = Ledger::default();
    for i in 0..4 {
        ledger.deliver(recipient(i), &text(i));
    }
    for user in bulk_recipients(0).skip(1) {
        ledger.deliver(user, "bulk 0");
    }
    cases.push(("bulk message 0 never reached user 0", ledger));
    for (expected, ledger) in cases {
        let problem = ledger
            .check_complete(&ends)
            .expect_err("a broken delivery passed");
        assert!(
            problem.contains(expected),
            "{expected:?} not in {problem:?}"
        );
    }
}
