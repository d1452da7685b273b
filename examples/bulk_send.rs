//! Sends one message to many users with a progress bar, then prints the
//! throughput and the process's peak memory.
//!
//! ```text
//! cargo run --release --example bulk_send                  # 1,000,000 users
//! cargo run --release --example bulk_send -- --users 50000
//! ```
//!
//! The store lives in a temporary directory, removed at the end.

use std::time::Instant;

use async_messages::{Level, MessageStore, Progress};
use indicatif::{ProgressBar, ProgressStyle};

/// A field of `/proc/self/status` in KiB (`VmHWM` = peak RSS), if readable.
fn status_kb(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut users: u64 = 1_000_000;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--users" => {
                users = args
                    .next()
                    .ok_or("--users needs a number")?
                    .replace(['_', ','], "")
                    .parse()?;
            }
            other => {
                return Err(
                    format!("unknown argument {other:?}; usage: bulk_send [--users N]").into(),
                );
            }
        }
    }

    let dir = tempfile::tempdir()?;
    let store = MessageStore::open(dir.path().join("messages"))?;
    let idle_kb = status_kb("VmRSS");

    let bar = ProgressBar::new(users).with_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} users ({per_sec}, eta {eta}) {msg}",
        )?,
    );
    bar.set_message("writing");
    let started = Instant::now();
    let sent = store.message_users_with_progress(
        0..users,
        "Scheduled maintenance tonight at 22:00 UTC: expect a short outage.",
        Level::Warning,
        |progress: Progress| {
            bar.set_position(progress.written);
            if progress.committed {
                bar.set_message("committed");
            }
        },
    )?;
    let elapsed = started.elapsed();
    bar.finish();

    let rate = sent.recipients() as f64 / elapsed.as_secs_f64();
    let mb = |kb: Option<u64>| {
        kb.map_or("unknown".to_owned(), |kb| {
            format!("{:.1} MB", kb as f64 / 1024.0)
        })
    };
    println!(
        "sent to {} users in {:.2} s: {:.0} messages/s; peak memory (VmHWM) {}, idle before the send {}; {} on disk",
        sent.recipients(),
        elapsed.as_secs_f64(),
        rate,
        mb(status_kb("VmHWM")),
        mb(idle_kb),
        mb(Some(store.size_on_disk()? / 1024)),
    );
    Ok(())
}
