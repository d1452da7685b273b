//! Sends one message to many users with a progress bar, then prints the
//! throughput, the peak memory and the disk use.
//!
//! ```text
//! cargo run --release --example bulk_send                      # 1,000,000 users
//! cargo run --release --example bulk_send -- --users 10000000  # 10 million
//! cargo run --release --example bulk_send -- --users 50000 --dir /tmp/store
//! ```
//!
//! The store lives in a temporary directory, removed at the end (or in
//! `--dir`, which must not exist yet and is kept). The users are streamed
//! from a range, never collected: the memory above idle is the store's own.

use std::path::{Path, PathBuf};
use std::time::Instant;

use async_messages::{Level, MessageStore, Progress};
use indicatif::{HumanCount, ProgressBar, ProgressState, ProgressStyle};

const TEXT: &str = "Scheduled maintenance tonight at 22:00 UTC: expect a short outage.";
/// Bytes of a user id in the payload (a u64).
const USER_ID_BYTES: u64 = 8;

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

/// Allocated bytes (st_blocks × 512) of every file under `dir`.
fn du(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            du(&entry.path())?
        } else {
            meta.blocks() * 512
        };
    }
    Ok(total)
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: bulk_send [--users N] [--dir PATH]";
    let mut users: u64 = 1_000_000;
    let mut dir: Option<PathBuf> = None;
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
            "--dir" => dir = Some(args.next().ok_or("--dir needs a path")?.into()),
            other => return Err(format!("unknown argument {other:?}; {usage}").into()),
        }
    }
    let tmp;
    let path = match dir {
        Some(dir) if dir.exists() => {
            return Err(format!("{} exists; give a new directory", dir.display()).into());
        }
        Some(dir) => dir,
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().join("messages")
        }
    };

    let store = MessageStore::open(&path)?;
    let bar = ProgressBar::new(users).with_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} users ({rate}, eta {eta}) {msg}",
        )?
        .with_key("rate", |state: &ProgressState, out: &mut dyn std::fmt::Write| {
            let _ = write!(out, "{}/s", HumanCount(state.per_sec() as u64));
        }),
    );
    bar.set_message("writing");
    // Idle: the store open, nothing sent. Then reset the kernel's peak
    // (VmHWM) to the current RSS, so that the peak read after the send is
    // the send's own (Linux 4.0 and later; if it fails, the peak includes
    // opening the store).
    let idle_kb = status_kb("VmRSS");
    let peak_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();

    let started = Instant::now();
    // `0..users` is handed over as an iterator: the store streams it.
    let sent =
        store.message_users_with_progress(0..users, TEXT, Level::Warning, |p: Progress| {
            bar.set_position(p.written);
            if p.committed {
                bar.set_message("committed");
            }
        })?;
    let elapsed = started.elapsed();
    let peak_kb = status_kb("VmHWM");
    bar.finish();
    if !bar.is_hidden() {
        // indicatif leaves the cursor at the end of the bar's line.
        eprintln!();
    }

    let recipients = sent.recipients();
    println!(
        "sent to {} users in {:.2} s: {:.0} recipients/s (durable when it returned)",
        recipients,
        elapsed.as_secs_f64(),
        recipients as f64 / elapsed.as_secs_f64()
    );
    match (peak_kb, idle_kb) {
        (Some(peak), Some(idle)) => println!(
            "memory: peak (VmHWM) {}, idle before the send {}, peak above idle {}{}",
            mb(peak * 1024),
            mb(idle * 1024),
            mb(peak.saturating_sub(idle) * 1024),
            if peak_reset {
                ""
            } else {
                " (VmHWM could not be reset: includes opening the store)"
            }
        ),
        _ => println!("memory: unknown (/proc/self/status is not readable)"),
    }
    store.flush()?;
    let payload = recipients * (USER_ID_BYTES + TEXT.len() as u64);
    let disk = du(&path)?;
    println!(
        "disk after the send: {} allocated ({:.3}× the payload of {} = {} recipients × ({} bytes of text + {USER_ID_BYTES} of user id)); size_on_disk() {}",
        mb(disk),
        disk as f64 / payload.max(1) as f64,
        mb(payload),
        recipients,
        TEXT.len(),
        mb(store.size_on_disk()?),
    );
    Ok(())
}
