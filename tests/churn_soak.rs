//! Churn soak: senders and drainers run continuously against one store
//! (default `Durability::Immediate`), while the test samples the store's
//! size on disk and the process's resident memory. Both must stay bounded:
//! drained messages' space is reused, and nothing in memory grows with the
//! number of messages that went through.
//!
//! 10 s by default; 5 minutes in the ignored `churn_soak_long`. Both print
//! their curves (one sample per second).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    let mut workers = Vec::new();
    for s in 0..SENDERS {
        let (store, stop, sent) = (store.clone(), stop.clone(), sent.clone());
        workers.push(std::thread::spawn(move || -> Result<()> {
            let mut i = s;
            while !stop.load(Ordering::Relaxed) {
                let text = format!("report {i} is ready: {}", "x".repeat((i % 200) as usize));
                store.message_user(i.wrapping_mul(7919) % USERS, text, Level::Info)?;
                sent.fetch_add(1, Ordering::Relaxed);
                i += SENDERS;
                // Now and then a bulk send to 50 users.
                if i % 500 == 0 {
                    store.message_users(
                        (0..50).map(|u| (i + u * 31) % USERS),
                        "bulk",
                        Level::Info,
                    )?;
                    sent.fetch_add(50, Ordering::Relaxed);
                }
            }
            Ok(())
        }));
    }
    for d in 0..DRAINERS {
        let (store, stop, drained) = (store.clone(), stop.clone(), drained.clone());
        workers.push(std::thread::spawn(move || -> Result<()> {
            let mut i = d;
            while !stop.load(Ordering::Relaxed) {
                let got = store.get_messages(i.wrapping_mul(104_729) % USERS)?;
                drained.fetch_add(got.len() as u64, Ordering::Relaxed);
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
    for worker in workers {
        worker.join().expect("worker panicked")?;
    }
    // Everything sent is drained or still queued.
    let mut queued = 0;
    for user in 0..USERS {
        queued += store.get_messages(user)?.len() as u64;
    }
    let (sent, drained) = (
        sent.load(Ordering::Relaxed),
        drained.load(Ordering::Relaxed),
    );
    assert_eq!(sent, drained + queued, "sent = drained + still queued");
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
