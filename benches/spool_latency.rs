//! Latency from a spool send (another process's way in) to the message being
//! returned by `get_messages` in the app that holds the store, while it runs.
//! Goal (issue 11): p99 ≤ 50 ms.
//!
//! ```sh
//! cargo bench --bench spool_latency            # 500 sends
//! cargo bench --bench spool_latency -- --quick # 100 sends
//! ```
//!
//! The sender is a thread of this process writing through `Spool`, exactly
//! as another process would (a file in the spool directory, fsynced); the
//! app side polls `get_messages` every 0.2 ms, so the figures include up to
//! 0.2 ms of polling. The store uses the default `Durability::Immediate`.

use std::time::{Duration, Instant};

use async_messages::{MessageStore, Spool};

#[path = "support/commit.rs"]
mod commit;
use commit::commit;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 100 } else { 500 };
    let dir = tempfile::tempdir()?;
    let store = MessageStore::open(dir.path())?;
    let spool = Spool::open(dir.path())?;
    let mut send = Vec::with_capacity(rounds);
    let mut arrive = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let user = round as u64;
        let started = Instant::now();
        spool.info(user, format!("spooled message {round}"))?;
        send.push(started.elapsed());
        loop {
            if !store.get_messages(user)?.is_empty() {
                break;
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(format!("message {round} did not arrive within 10 s").into());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        arrive.push(started.elapsed());
    }
    send.sort();
    arrive.sort();
    println!(
        "spool latency: commit {}, {rounds} sends, one at a time, while the app holds the store",
        commit()
    );
    println!("| measure | p50 | p99 | max | goal |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| spool send returns (file fsynced and renamed) | {:.2?} | {:.2?} | {:.2?} | |",
        percentile(&send, 0.5),
        percentile(&send, 0.99),
        send[send.len() - 1]
    );
    let p99 = percentile(&arrive, 0.99);
    println!(
        "| send to `get_messages` returning it | {:.2?} | {:.2?} | {:.2?} | p99 ≤ 50 ms: {} |",
        percentile(&arrive, 0.5),
        p99,
        arrive[arrive.len() - 1],
        if p99 <= Duration::from_millis(50) {
            "met"
        } else {
            "missed"
        }
    );
    Ok(())
}
