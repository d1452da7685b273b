//! async-messages against raw sled 0.34.7 and SQLite (rusqlite, bundled, WAL),
//! the goals of issue 10, in one run, printed as one Markdown table with each
//! goal, the measured figures, the ratio the goal is about and met / missed.
//!
//! ```text
//! cargo bench --bench compare                  # full run (1,000,000 recipients), for README
//! cargo bench --bench compare -- --quick       # smoke run, small sizes, about 20 s
//! cargo bench --bench compare -- --only drain  # one workload: bulk disk drain empty durable single
//! cargo bench --bench compare --features redis            # + the Redis engine's rows
//! cargo bench --bench compare --features redis -- --only redis --quick  # the Redis rows alone
//! ```
//!
//! Every (workload, implementation) pair runs in its own child process (this
//! binary, re-invoked as `--child WORKLOAD IMPL N`), so each one starts from a
//! fresh heap and its peak RSS is its own. A child reads its idle `VmRSS`
//! after opening the database, then resets the kernel's peak (`VmHWM`, by
//! writing 5 to `/proc/self/clear_refs`) so that "peak above idle" is the
//! peak of the measured work alone. Each child works in its own temporary
//! directory, removed when it exits.
//!
//! # The baselines, written as an expert would
//! Both store a bulk message's text once, like async-messages:
//! - **raw sled**: trees `inbox` (key = user ‖ message id; value = the
//!   message inline for a direct message, empty for a bulk one), `texts`
//!   (bulk id → level, sent time, text) and `remaining` (bulk id → recipients
//!   left; the text is removed when it reaches 0). The same page cache size
//!   as ours (`CACHE_BYTES`), sled's default `LowSpace` mode, its default
//!   500 ms background flush.
//! - **SQLite**: `texts(id, level, sent_at, text, remaining)` and a clustered
//!   `inbox(user, id, level, sent_at, text) WITHOUT ROWID` whose level, time
//!   and text are NULL for a bulk message; a drain is a deferred transaction:
//!   SELECT … LEFT JOIN texts, then (only if anything was found) DELETE and
//!   decrement / remove the shared texts. The same page cache size as ours.
//!
//! # Like durability classes
//! - ours `Periodic(500 ms)` against sled without flushes and SQLite
//!   `synchronous=NORMAL` (nothing fsyncs per operation);
//! - ours `Immediate` against sled insert + `flush` (+ `fdatasync`, which is
//!   what makes it power-safe like ours) and SQLite `synchronous=FULL`
//!   (fsync per commit), its durable writes all going through one shared
//!   connection behind a mutex.
//!
//! # The Redis engine (feature `redis`)
//! Built with `--features redis` and with `redis-server` on `PATH`, the
//! same run adds our store on Redis (`Builder::redis`) to the bulk, drain,
//! empty, single and durable workloads, printed as a second table beside
//! the figures of ours on sled, raw sled and SQLite. Each Redis child
//! starts its own `redis-server` (tests/common/redis.rs: a free port of
//! 127.0.0.1, its own temporary directory, `--save "" --appendonly yes`),
//! with `--appendfsync everysec` (about `Periodic(1 s)`: the no-fsync
//! class) or, for the rows that promise "durable when it returns",
//! `--appendfsync always` (Redis fsyncs the AOF before it replies). The
//! server is another process, reached over loopback TCP: its CPU and memory
//! are not in the child's figures (its memory is reported apart). Without
//! the feature, or without `redis-server`, the run says why the Redis rows
//! are missing. `--only redis` runs just the workloads with Redis rows,
//! with ours on sled and the baselines those rows compare with.

#[path = "support/commit.rs"]
mod commit;
use commit::commit;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_messages::{Durability, Level, MessageStore};
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

/// A real `redis-server` per child (the integration tests' helper).
#[allow(dead_code)]
#[path = "../tests/common/redis.rs"]
mod redis_server;

use redis_server::RedisServer;

type Res<T> = Result<T, Box<dyn std::error::Error>>;
type Report = BTreeMap<String, f64>;

/// The text of every bulk send (70 bytes).
const TEXT: &str = "Your export of 2026-11-26 is ready: download it from the reports page.";
/// The text of every direct (single-recipient) message.
const DIRECT: &str = "Your password was changed.";
/// Bytes of a user id in the payload definition (a u64).
const USER_ID_BYTES: u64 = 8;
/// Page cache of every implementation: ours (`Builder::cache_bytes`), raw
/// sled (`cache_capacity`) and SQLite (`PRAGMA cache_size`).
const CACHE_BYTES: u64 = 8 << 20;
/// The peak-RSS goal: above idle during a bulk send (16 MB).
const RSS_LIMIT_BYTES: f64 = 16e6;
/// The drained-disk goal: within this of an empty store (4 MiB).
const DRAINED_SLACK_BYTES: f64 = (4 << 20) as f64;
/// Runs of each short workload (their median is reported).
const REPEATS: usize = 3;
/// Every workload, in the order they run.
const WORKLOADS: [&str; 6] = ["bulk", "disk", "drain", "empty", "durable", "single"];
/// Thread counts of the durable-send workload (64: a web server's concurrency).
const DURABLE_THREADS: [u64; 3] = [1, 8, 64];
/// Thread counts of the durable-send workload on Redis (`appendfsync always`).
const REDIS_DURABLE_THREADS: [u64; 2] = [1, 64];
/// The key prefix of our store on Redis.
const REDIS_NAMESPACE: &str = "compare";

/// Sizes for one run.
struct Sizes {
    /// Recipients of every bulk send.
    recipients: u64,
    /// Timed drains (Periodic / NORMAL) and timed empty-queue requests.
    samples: u64,
    /// Timed drains with a durable store (each one fsyncs).
    durable_samples: u64,
    /// Milliseconds each durable-send configuration runs.
    durable_ms: u64,
    /// Sends in the single-send workload.
    single_sends: u64,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                recipients: 20_000,
                samples: 2_000,
                durable_samples: 200,
                durable_ms: 250,
                single_sends: 20_000,
            }
        } else {
            Sizes {
                recipients: 1_000_000,
                samples: 100_000,
                durable_samples: 1_000,
                durable_ms: 3_000,
                single_sends: 200_000,
            }
        }
    }
}

/// The `i`-th recipient of a bulk send: every user id that is not a multiple
/// of 5 ("everyone but those who opted out"). Not one dense range, so no
/// implementation is measured on a best case, and the users left out (the
/// multiples of 5) lie among the recipients for the empty-queue workload.
fn recipient(i: u64) -> u64 {
    i + i / 4 + 1
}

/// The recipients of a bulk send to `n` users, streamed.
fn recipients(n: u64) -> impl Iterator<Item = u64> + Clone {
    (0..n).map(recipient)
}

/// The `j`-th user left out of the bulk send.
fn outsider(j: u64) -> u64 {
    5 * j
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(at) = args.iter().position(|a| a == "--child") {
        let usage = "--child WORKLOAD IMPL N";
        let workload = args.get(at + 1).ok_or(usage)?;
        let imp = args.get(at + 2).ok_or(usage)?;
        let n: u64 = args.get(at + 3).ok_or(usage)?.parse()?;
        let sizes = Sizes::new(args.iter().any(|a| a == "--quick"));
        let report = child(workload, imp, n, &sizes)?;
        for (key, value) in report {
            println!("{key}={value}");
        }
        return Ok(());
    }
    let quick = args.iter().any(|a| a == "--quick");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|at| args.get(at + 1).cloned());
    if let Some(only) = &only
        && !WORKLOADS.contains(&only.as_str())
        && only != "redis"
    {
        return Err(format!("--only {only}: one of {} redis", WORKLOADS.join(" ")).into());
    }
    parent(quick, only.as_deref())
}

// ---------------------------------------------------------------- parent --

fn run_child(workload: &str, imp: &str, n: u64, quick: bool) -> Res<Report> {
    let started = Instant::now();
    let mut command = Command::new(std::env::current_exe()?);
    command.args(["--child", workload, imp, &n.to_string()]);
    if quick {
        command.arg("--quick");
    }
    let output = command.stderr(std::process::Stdio::inherit()).output()?;
    if !output.status.success() {
        return Err(format!("child {workload} {imp} {n} failed: {}", output.status).into());
    }
    let mut report = Report::new();
    for line in String::from_utf8(output.stdout)?.lines() {
        if let Some((key, value)) = line.split_once('=') {
            report.insert(key.to_owned(), value.parse()?);
        }
    }
    eprintln!(
        "  {workload:>7} {imp:<12} n={n:<9} {:>6.1} s  {}",
        started.elapsed().as_secs_f64(),
        report
            .iter()
            .map(|(k, v)| format!("{k}={v:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(report)
}

/// The median of each figure over several runs.
fn median(reports: &[Report]) -> Report {
    let mut out = Report::new();
    for key in reports.iter().flat_map(|r| r.keys()) {
        let mut values: Vec<f64> = reports.iter().filter_map(|r| r.get(key).copied()).collect();
        values.sort_by(f64::total_cmp);
        out.insert(key.clone(), values[values.len() / 2]);
    }
    out
}

/// All results, by "workload/impl".
struct Results(BTreeMap<String, Report>);

impl Results {
    fn get(&self, workload: &str, imp: &str, key: &str) -> Option<f64> {
        self.0.get(&format!("{workload}/{imp}"))?.get(key).copied()
    }

    fn has(&self, workload: &str) -> bool {
        self.0
            .keys()
            .any(|k| k.starts_with(&format!("{workload}/")))
    }
}

/// Why this run has no Redis rows, or `None` when it has them.
fn redis_missing() -> Option<String> {
    if !cfg!(feature = "redis") {
        return Some(
            "this bench was built without the crate's `redis` feature: \
             `cargo bench --bench compare --features redis` adds them"
                .into(),
        );
    }
    if redis_server::redis_server_path().is_none() {
        return Some(
            "`redis-server` is not on PATH: install it (Debian/Ubuntu: `sudo apt-get install redis-server`; \
             its service need not run, the bench starts its own servers) and run again"
                .into(),
        );
    }
    None
}

/// Whether `--only redis` runs `imp` of `workload`: the Redis children and
/// those whose figures the Redis rows compare with.
fn for_redis_rows(workload: &str, imp: &str) -> bool {
    match workload {
        "disk" => false,
        "durable" => {
            !imp.starts_with("sled-")
                && REDIS_DURABLE_THREADS
                    .iter()
                    .any(|t| imp.ends_with(&format!("-{t}")))
        }
        _ => !matches!(imp, "ours-durable" | "sqlite-full"),
    }
}

fn parent(quick: bool, only: Option<&str>) -> Res<()> {
    let sizes = Sizes::new(quick);
    let redis_missing = redis_missing();
    if let (Some(why), Some("redis")) = (&redis_missing, only) {
        return Err(format!("--only redis: no Redis rows: {why}").into());
    }
    let with_redis = |imps: &[&str], redis: &[&str]| -> Vec<String> {
        let redis = if redis_missing.is_none() { redis } else { &[] };
        imps.iter().chain(redis).map(|s| (*s).to_owned()).collect()
    };
    let threads = |names: &[&str], threads: &[u64]| -> Vec<String> {
        names
            .iter()
            .flat_map(|name| threads.iter().map(move |t| format!("{name}-{t}")))
            .collect()
    };
    let mut durable_imps = threads(&["ours", "sled", "sledsync", "sqlite"], &DURABLE_THREADS);
    if redis_missing.is_none() {
        durable_imps.extend(threads(&["redis"], &REDIS_DURABLE_THREADS));
    }
    let plan: Vec<(&str, Vec<String>, u64)> = vec![
        (
            "bulk",
            with_redis(&["ours", "sled", "sqlite"], &["redis-always", "redis"]),
            sizes.recipients,
        ),
        (
            "disk",
            with_redis(&["ours", "sled", "sqlite"], &[]),
            sizes.recipients,
        ),
        (
            "drain",
            with_redis(
                &["ours", "sled", "sqlite", "ours-durable", "sqlite-full"],
                &["redis"],
            ),
            sizes.recipients,
        ),
        (
            "empty",
            with_redis(&["ours", "sled", "sqlite"], &["redis"]),
            sizes.recipients,
        ),
        ("durable", durable_imps, sizes.durable_ms),
        (
            "single",
            with_redis(&["ours", "sled", "sqlite"], &["redis"]),
            sizes.single_sends,
        ),
    ];
    eprintln!(
        "compare: {} mode; each line is one child process",
        if quick { "quick" } else { "full" }
    );
    if let Some(why) = &redis_missing {
        eprintln!("compare: no Redis rows: {why}");
    }
    let load_before = loadavg();
    let started = Instant::now();
    let mut results = Results(BTreeMap::new());
    for (workload, mut imps, n) in plan {
        match only {
            Some("redis") => imps.retain(|imp| for_redis_rows(workload, imp)),
            Some(o) if o != workload => continue,
            _ => {}
        }
        if imps.is_empty() {
            continue;
        }
        // Short workloads run REPEATS times, implementations interleaved,
        // and report the median of each figure: one busy moment on a shared
        // machine then moves no ratio.
        // The disk workload (1,000,000 drains) runs once.
        let repeats = if workload == "disk" { 1 } else { REPEATS };
        let mut runs: BTreeMap<&str, Vec<Report>> = BTreeMap::new();
        for _ in 0..repeats {
            for imp in &imps {
                runs.entry(imp)
                    .or_default()
                    .push(run_child(workload, imp, n, quick)?);
            }
        }
        for (imp, reports) in runs {
            results
                .0
                .insert(format!("{workload}/{imp}"), median(&reports));
        }
    }
    print_header(quick, &sizes);
    let smoke = if quick {
        " (quick run: small sizes, short runs; the verdicts are a smoke test, not the measurement)"
    } else {
        ""
    };
    if only != Some("redis") {
        let verdicts = print_table(&results, &sizes);
        let met_count = verdicts.iter().filter(|&&v| v).count();
        println!();
        println!(
            "Goals: {met_count} met, {} missed{smoke}.",
            verdicts.len() - met_count,
        );
    }
    match &redis_missing {
        Some(why) => {
            println!();
            println!("Redis rows: skipped: {why}.");
        }
        None => {
            let rows = redis_rows(&results, &sizes);
            println!();
            if rows.is_empty() {
                println!("Redis rows: none in this run (`--only redis` gives them alone).");
            } else {
                let verdicts = print_redis_table(rows);
                let met_count = verdicts.iter().filter(|&&v| v).count();
                println!();
                println!(
                    "Redis goals: {met_count} met, {} missed{smoke}; counted apart from the goals above.",
                    verdicts.len() - met_count,
                );
            }
        }
    }
    println!(
        "Run: {:.0} s; load average (1 min) before {load_before}, after {} (on {} CPUs).",
        started.elapsed().as_secs_f64(),
        loadavg(),
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    Ok(())
}

/// CPU model and kernel, for the header.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned());
    let rustc = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "rustc ?".into());
    format!(
        "{} CPUs, {cpu}; Linux {kernel}; {rustc}",
        std::thread::available_parallelism().map_or(0, usize::from)
    )
}

fn print_header(quick: bool, sizes: &Sizes) {
    println!();
    println!(
        "async-messages against raw sled 0.34.7 and SQLite {} (rusqlite, bundled, WAL): commit {}, {} run \
         ({} recipients per bulk send).",
        rusqlite::version(),
        commit(),
        if quick { "quick (smoke)" } else { "full" },
        group(sizes.recipients as f64)
    );
    println!("Machine: {}.", machine());
}

/// 1234567.8 -> "1,234,568"
fn group(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn fmt_rate(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{} /s", group(v)))
}

fn fmt_ns(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| {
        if v >= 10_000.0 {
            format!("{:.0} µs", v / 1000.0)
        } else if v >= 1000.0 {
            format!("{:.1} µs", v / 1000.0)
        } else {
            format!("{v:.0} ns")
        }
    })
}

/// Bytes as decimal megabytes.
fn fmt_mb(bytes: Option<f64>) -> String {
    bytes.map_or("–".into(), |b| format!("{:.1} MB", b / 1e6))
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| {
        if r >= 100.0 {
            format!("{r:.0}×")
        } else {
            format!("{r:.2}×")
        }
    })
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn best(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    values.into_iter().flatten().reduce(f64::max)
}

/// One row of the table.
struct Row {
    workload: String,
    goal: String,
    ours: String,
    sled: String,
    sqlite: String,
    ratio: String,
    /// `Some` for a goal row, `None` for a row given for reference.
    met: Option<Option<bool>>,
}

fn print_table(r: &Results, sizes: &Sizes) -> Vec<bool> {
    let rows = table_rows(r, sizes);
    println!();
    println!("| workload | goal | async-messages | raw sled 0.34.7 | SQLite | ratio | |");
    println!("|---|---|---|---|---|---|---|");
    let mut verdicts = Vec::new();
    for row in rows {
        let verdict = match row.met {
            None => "(reference)",
            Some(None) => "–",
            Some(Some(true)) => "**met**",
            Some(Some(false)) => "**missed**",
        };
        if let Some(Some(met)) = row.met {
            verdicts.push(met);
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {verdict} |",
            row.workload, row.goal, row.ours, row.sled, row.sqlite, row.ratio
        );
    }
    let n = sizes.recipients;
    let payload = n * (USER_ID_BYTES + TEXT.len() as u64);
    println!();
    println!(
        "- Payload = recipients × (text + user id) = {} × ({} + {USER_ID_BYTES}) bytes = {} bytes.",
        group(n as f64),
        TEXT.len(),
        group(payload as f64)
    );
    println!(
        "- Recipients: user ids 1, 2, 3, 4, 6, … (every id that is not a multiple of 5, ascending, streamed from an \
         iterator); the empty-queue requests go to the multiples of 5 in between."
    );
    println!(
        "- Durability classes: ours `Periodic(500 ms)` vs sled without flush and SQLite `synchronous=NORMAL`; \
         ours `Immediate` vs sled insert + flush (+ `fdatasync`) and SQLite `synchronous=FULL` (durable writes through \
         one shared connection behind a mutex). A bulk send is durable when it returns in all three."
    );
    println!(
        "- Baselines store a bulk text once (sled: `texts` + `remaining` trees and an empty value per recipient; \
         SQLite: a `texts` table and a `WITHOUT ROWID` inbox row per recipient). Page cache {} MiB for all three.",
        CACHE_BYTES >> 20
    );
    println!(
        "- Peak RSS above idle = `VmHWM` − idle `VmRSS`, with `VmHWM` reset after the idle reading. \
         Disk = allocated blocks (st_blocks × 512) of the database directory after a flush (SQLite: after a \
         `wal_checkpoint(TRUNCATE)`). MB = 10⁶ bytes, MiB = 2²⁰."
    );
    if ["ours", "sled", "sqlite"]
        .iter()
        .any(|imp| r.get("bulk", imp, "hwm_reset") == Some(0.0))
    {
        println!(
            "- **Warning**: `VmHWM` could not be reset (writing /proc/self/clear_refs failed): peak RSS includes opening."
        );
    }
    println!(
        "- Ratio: the figure the goal is about. Disk rows: one run; the other rows: the median of {REPEATS} runs, \
         implementations interleaved."
    );
    verdicts
}

fn table_rows(r: &Results, sizes: &Sizes) -> Vec<Row> {
    let n = sizes.recipients;
    let mut rows = Vec::new();

    if r.has("bulk") {
        bulk_rows(r, n, &mut rows);
    }
    if r.has("disk") {
        disk_rows(r, n, &mut rows);
    }
    if r.has("drain") {
        drain_rows(r, n, &mut rows);
    }
    if r.has("empty") {
        empty_rows(r, n, &mut rows);
    }
    if r.has("durable") {
        durable_rows(r, &mut rows);
    }
    if r.has("single") {
        let ours = r.get("single", "ours", "rate");
        let sled = r.get("single", "sled", "rate");
        let vs = ratio(ours, sled);
        rows.push(Row {
            workload: format!(
                "single sends, 1 thread, {} msgs (`Periodic`)",
                group(sizes.single_sends as f64)
            ),
            goal: "≥ 0.8× raw sled".into(),
            ours: fmt_rate(ours),
            sled: format!("{} (generate_id + insert)", fmt_rate(sled)),
            sqlite: format!(
                "{} (NORMAL, autocommit)",
                fmt_rate(r.get("single", "sqlite", "rate"))
            ),
            ratio: format!("{} sled", fmt_ratio(vs)),
            met: Some(vs.map(|x| x >= 0.8)),
        });
    }
    rows
}

fn bulk_rows(r: &Results, n: u64, rows: &mut Vec<Row>) {
    let ours = r.get("bulk", "ours", "rate");
    let sqlite = r.get("bulk", "sqlite", "rate");
    let vs = ratio(ours, sqlite);
    rows.push(Row {
        workload: format!(
            "`message_users` to {} users, durable when it returns (recipients/s)",
            group(n as f64)
        ),
        goal: "≥ 10× SQLite".into(),
        ours: format!("{} (`Immediate`)", fmt_rate(ours)),
        sled: format!(
            "{} (inserts, text last, flush + fdatasync)",
            fmt_rate(r.get("bulk", "sled", "rate"))
        ),
        sqlite: format!("{} (1 transaction, FULL)", fmt_rate(sqlite)),
        ratio: format!("{} SQLite", fmt_ratio(vs)),
        met: Some(vs.map(|x| x >= 10.0)),
    });
    let above = |imp: &str| {
        // The peak can read a few pages below the idle RSS (pages freed
        // after the reading): that is no memory above idle.
        let kb = r.get("bulk", imp, "send_hwm_kb")? - r.get("bulk", imp, "idle_kb")?;
        Some(kb.max(0.0) * 1024.0)
    };
    let ours_above = above("ours");
    rows.push(Row {
        workload: "peak RSS above idle during that send".into(),
        goal: format!("≤ {}", fmt_mb(Some(RSS_LIMIT_BYTES))),
        ours: format!(
            "{} (idle {})",
            fmt_mb(ours_above),
            fmt_mb(r.get("bulk", "ours", "idle_kb").map(|kb| kb * 1024.0))
        ),
        sled: fmt_mb(above("sled")),
        sqlite: fmt_mb(above("sqlite")),
        ratio: format!(
            "{} the limit",
            fmt_ratio(ratio(ours_above, Some(RSS_LIMIT_BYTES)))
        ),
        met: Some(ours_above.map(|b| b <= RSS_LIMIT_BYTES)),
    });
}

fn disk_rows(r: &Results, n: u64, rows: &mut Vec<Row>) {
    let payload = (n * (USER_ID_BYTES + TEXT.len() as u64)) as f64;
    let with_payload = |b: Option<f64>| {
        b.map_or("–".into(), |b| {
            format!("{} ({:.3}× payload)", fmt_mb(Some(b)), b / payload)
        })
    };
    let full = |imp: &str| r.get("disk", imp, "full_bytes");
    rows.push(Row {
        workload: format!(
            "disk after `message_users` to {} users (flushed)",
            group(n as f64)
        ),
        goal: format!("≤ 0.1× payload ({})", fmt_mb(Some(payload * 0.1))),
        ours: with_payload(full("ours")),
        sled: with_payload(full("sled")),
        sqlite: with_payload(full("sqlite")),
        ratio: format!("{} payload", fmt_ratio(ratio(full("ours"), Some(payload)))),
        met: Some(full("ours").map(|b| b <= 0.1 * payload)),
    });
    let over_empty =
        |imp: &str, key: &str| Some(r.get("disk", imp, key)? - r.get("disk", imp, "empty_bytes")?);
    let fmt_over = |imp: &str, key: &str| {
        format!(
            "{} (empty store {}; +{:.1} MiB)",
            fmt_mb(r.get("disk", imp, key)),
            fmt_mb(r.get("disk", imp, "empty_bytes")),
            over_empty(imp, key).unwrap_or(f64::NAN) / f64::from(1 << 20)
        )
    };
    let drained = over_empty("ours", "drained_bytes");
    rows.push(Row {
        workload: format!(
            "disk after all {} recipients drained with `get_messages` (flushed)",
            group(n as f64)
        ),
        goal: "≤ empty store + 4 MiB".into(),
        ours: fmt_over("ours", "drained_bytes"),
        sled: fmt_over("sled", "drained_bytes"),
        sqlite: fmt_over("sqlite", "drained_bytes"),
        ratio: format!(
            "{} the 4 MiB allowance",
            fmt_ratio(ratio(drained, Some(DRAINED_SLACK_BYTES)))
        ),
        met: Some(drained.map(|b| b <= DRAINED_SLACK_BYTES)),
    });
    rows.push(Row {
        workload: "… and after close + reopen".into(),
        goal: "(report)".into(),
        ours: fmt_over("ours", "reopened_bytes"),
        sled: fmt_over("sled", "reopened_bytes"),
        sqlite: fmt_over("sqlite", "reopened_bytes"),
        ratio: format!(
            "{} the 4 MiB allowance",
            fmt_ratio(ratio(
                over_empty("ours", "reopened_bytes"),
                Some(DRAINED_SLACK_BYTES)
            ))
        ),
        met: None,
    });
    rows.push(Row {
        workload: "`size_on_disk()`: empty / after the send / drained".into(),
        goal: "(report)".into(),
        ours: ["sod_empty", "sod_full", "sod_drained"]
            .map(|k| fmt_mb(r.get("disk", "ours", k)))
            .join(" / "),
        sled: "–".into(),
        sqlite: "–".into(),
        ratio: "–".into(),
        met: None,
    });
    rows.push(Row {
        workload: "time to drain all recipients, one `get_messages` each (`Periodic`)".into(),
        goal: "(report)".into(),
        ours: fmt_rate(r.get("disk", "ours", "drain_rate")),
        sled: fmt_rate(r.get("disk", "sled", "drain_rate")),
        sqlite: format!(
            "{} (NORMAL)",
            fmt_rate(r.get("disk", "sqlite", "drain_rate"))
        ),
        ratio: format!(
            "{} SQLite",
            fmt_ratio(ratio(
                r.get("disk", "ours", "drain_rate"),
                r.get("disk", "sqlite", "drain_rate")
            ))
        ),
        met: None,
    });
}

fn drain_rows(r: &Results, n: u64, rows: &mut Vec<Row>) {
    for pct in ["p99", "p50"] {
        let ours = r.get("drain", "ours", pct);
        let sqlite = r.get("drain", "sqlite", pct);
        let vs = ratio(ours, sqlite);
        let goal = pct == "p99";
        rows.push(Row {
            workload: format!(
                "`get_messages` of a user holding 1 bulk (to {}) + 1 direct message, {pct} (`Periodic`)",
                group(n as f64)
            ),
            goal: if goal {
                "≤ 1.0× SQLite".into()
            } else {
                "(report)".into()
            },
            ours: fmt_ns(ours),
            sled: format!("{} (scan + remove)", fmt_ns(r.get("drain", "sled", pct))),
            sqlite: format!("{} (NORMAL)", fmt_ns(sqlite)),
            ratio: format!("{} SQLite", fmt_ratio(vs)),
            met: goal.then_some(vs.map(|x| x <= 1.0)),
        });
    }
    let ours = r.get("drain", "ours-durable", "p99");
    let sqlite = r.get("drain", "sqlite-full", "p99");
    rows.push(Row {
        workload: "… the same, p99, durable (`Immediate`)".into(),
        goal: "(report)".into(),
        ours: fmt_ns(ours),
        sled: "–".into(),
        sqlite: format!("{} (FULL)", fmt_ns(sqlite)),
        ratio: format!("{} SQLite", fmt_ratio(ratio(ours, sqlite))),
        met: None,
    });
}

fn empty_rows(r: &Results, n: u64, rows: &mut Vec<Row>) {
    for (pct, limit) in [("p50", Some(1000.0)), ("p99", None)] {
        let ours = r.get("empty", "ours", pct);
        rows.push(Row {
            workload: format!(
                "`get_messages`, empty queue, {pct} (a bulk to {} other users pending)",
                group(n as f64)
            ),
            goal: limit.map_or("(report)".into(), |l| format!("≤ {}", fmt_ns(Some(l)))),
            ours: fmt_ns(ours),
            sled: format!("{} (scan_prefix)", fmt_ns(r.get("empty", "sled", pct))),
            sqlite: format!("{} (SELECT)", fmt_ns(r.get("empty", "sqlite", pct))),
            ratio: limit.map_or("–".into(), |l| {
                format!("{} the limit", fmt_ratio(ratio(ours, Some(l))))
            }),
            met: limit.map(|l| ours.map(|v| v <= l)),
        });
    }
}

fn durable_rows(r: &Results, rows: &mut Vec<Row>) {
    let rate = |imp: &str, t: u64| r.get("durable", &format!("{imp}-{t}"), "rate");
    let sqlite_best = best(DURABLE_THREADS.map(|t| rate("sqlite", t)));
    let sled_cell = |t: u64| {
        format!(
            "{} (+ fdatasync); flush only {}",
            fmt_rate(rate("sledsync", t)),
            fmt_rate(rate("sled", t))
        )
    };
    let ours64 = rate("ours", 64);
    let vs_sqlite = ratio(ours64, sqlite_best);
    rows.push(Row {
        workload: "durable sends, 64 threads (`Immediate`; msgs/s)".into(),
        goal: "≥ 10× SQLite FULL (its best thread count)".into(),
        ours: fmt_rate(ours64),
        sled: sled_cell(64),
        sqlite: format!(
            "{} (64 threads; best {})",
            fmt_rate(rate("sqlite", 64)),
            fmt_rate(sqlite_best)
        ),
        ratio: format!("{} SQLite", fmt_ratio(vs_sqlite)),
        met: Some(vs_sqlite.map(|x| x >= 10.0)),
    });
    let vs_one = ratio(ours64, rate("ours", 1));
    rows.push(Row {
        workload: "… the same against one thread of ours".into(),
        goal: "≥ 5× ours, 1 thread".into(),
        ours: format!(
            "{} (1 thread {})",
            fmt_rate(ours64),
            fmt_rate(rate("ours", 1))
        ),
        sled: "–".into(),
        sqlite: "–".into(),
        ratio: format!("{} 1 thread", fmt_ratio(vs_one)),
        met: Some(vs_one.map(|x| x >= 5.0)),
    });
    for t in [8, 1] {
        rows.push(Row {
            workload: format!("durable sends, {t} thread{}", if t == 1 { "" } else { "s" }),
            goal: "(report)".into(),
            ours: fmt_rate(rate("ours", t)),
            sled: sled_cell(t),
            sqlite: fmt_rate(rate("sqlite", t)),
            ratio: format!(
                "{} SQLite, {} sled + fdatasync",
                fmt_ratio(ratio(rate("ours", t), rate("sqlite", t))),
                fmt_ratio(ratio(rate("ours", t), rate("sledsync", t)))
            ),
            met: None,
        });
    }
}

/// One row of the Redis table.
struct RedisRow {
    workload: String,
    redis: String,
    ours: String,
    sled: String,
    sqlite: String,
    ratio: String,
    goal: String,
    /// `Some` when a goal applies to the Redis figure, `None` for a row
    /// given for information.
    met: Option<Option<bool>>,
}

/// Bytes as kB below a megabyte, else as MB.
fn fmt_size(bytes: Option<f64>) -> String {
    match bytes {
        Some(b) if b.abs() < 1e6 => format!("{:.1} kB", b / 1e3),
        b => fmt_mb(b),
    }
}

/// Prints the Redis table; returns the verdicts of the goals that apply.
fn print_redis_table(rows: Vec<RedisRow>) -> Vec<bool> {
    println!(
        "Our store on Redis {} (feature `redis`), beside ours on sled, raw sled and SQLite of the same run: \
         one `redis-server` per child process on 127.0.0.1, `--save \"\" --appendonly yes`, \
         `--appendfsync everysec` unless a row says `always`.",
        redis_version()
    );
    println!();
    println!(
        "| workload (Redis) | async-messages on Redis | async-messages on sled | raw sled 0.34.7 | SQLite | ratio | goal | |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut verdicts = Vec::new();
    for row in rows {
        let verdict = match row.met {
            None => "(informational)",
            Some(None) => "–",
            Some(Some(true)) => "**met**",
            Some(Some(false)) => "**missed**",
        };
        if let Some(Some(met)) = row.met {
            verdicts.push(met);
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {verdict} |",
            row.workload, row.redis, row.ours, row.sled, row.sqlite, row.ratio, row.goal
        );
    }
    println!();
    println!(
        "- fsync policy: `always` = Redis fsyncs its AOF before it replies (durable when it returns, the class of \
         `Immediate`, sled + fdatasync and SQLite FULL); everysec = written to the AOF before the reply, fsynced once \
         a second (the class of `Periodic`, sled without flush and SQLite NORMAL)."
    );
    println!(
        "- Goals that apply to Redis: the bulk send (≥ 10× SQLite) and the 64 durable writers (≥ 10× SQLite FULL, \
         ≥ 5× one writer), measured with `always`, the promise of the rows they come from; the peak RSS of a bulk \
         send, for the client process (the server's growth is given beside it). The drain, empty-queue and \
         single-send goals were set for an in-process store: on Redis each of those calls is a round trip over \
         loopback TCP to another process (a drain that finds messages: two, lease and commit), so those rows are \
         informational."
    );
    println!(
        "- The server is another process: its CPU (it shares this machine's cores with the client) is not in the \
         client's figures, nor its memory in the client's RSS. Server memory = growth of `INFO memory` \
         `used_memory`; AOF = allocated bytes of its `appendonlydir`. Rows: the median of {REPEATS} runs, each on \
         a fresh server."
    );
    verdicts
}

fn redis_rows(r: &Results, sizes: &Sizes) -> Vec<RedisRow> {
    let n = sizes.recipients;
    let mut rows = Vec::new();
    if r.has("bulk") {
        let always = r.get("bulk", "redis-always", "rate");
        let ours = r.get("bulk", "ours", "rate");
        let sqlite = r.get("bulk", "sqlite", "rate");
        let vs = ratio(always, sqlite);
        rows.push(RedisRow {
            workload: format!(
                "`message_users` to {} users (the same ids), durable when it returns (recipients/s)",
                group(n as f64)
            ),
            redis: format!(
                "{} (`always`); everysec {}",
                fmt_rate(always),
                fmt_rate(r.get("bulk", "redis", "rate"))
            ),
            ours: format!("{} (`Immediate`)", fmt_rate(ours)),
            sled: format!(
                "{} (flush + fdatasync)",
                fmt_rate(r.get("bulk", "sled", "rate"))
            ),
            sqlite: format!("{} (FULL)", fmt_rate(sqlite)),
            ratio: format!(
                "{} SQLite, {} ours on sled",
                fmt_ratio(vs),
                fmt_ratio(ratio(always, ours))
            ),
            goal: "≥ 10× SQLite".into(),
            met: Some(vs.map(|x| x >= 10.0)),
        });
        let above = |imp: &str| {
            let kb = r.get("bulk", imp, "send_hwm_kb")? - r.get("bulk", imp, "idle_kb")?;
            Some(kb.max(0.0) * 1024.0)
        };
        let client = above("redis-always");
        rows.push(RedisRow {
            workload: "peak RSS above idle during that send".into(),
            redis: format!(
                "{} (client; idle {}); server {} (`used_memory` growth), AOF {}",
                fmt_mb(client),
                fmt_mb(
                    r.get("bulk", "redis-always", "idle_kb")
                        .map(|kb| kb * 1024.0)
                ),
                fmt_size(r.get("bulk", "redis-always", "server_bytes")),
                fmt_size(r.get("bulk", "redis-always", "aof_bytes"))
            ),
            ours: fmt_mb(above("ours")),
            sled: fmt_mb(above("sled")),
            sqlite: fmt_mb(above("sqlite")),
            ratio: format!(
                "{} the limit (client)",
                fmt_ratio(ratio(client, Some(RSS_LIMIT_BYTES)))
            ),
            goal: format!("≤ {} (the client)", fmt_mb(Some(RSS_LIMIT_BYTES))),
            met: Some(client.map(|b| b <= RSS_LIMIT_BYTES)),
        });
    }
    if r.has("drain") {
        for pct in ["p99", "p50"] {
            let redis = r.get("drain", "redis", pct);
            let ours = r.get("drain", "ours", pct);
            let sqlite = r.get("drain", "sqlite", pct);
            rows.push(RedisRow {
                workload: format!(
                    "`get_messages` of a user holding 1 bulk (to {}) + 1 direct message, {pct}",
                    group(n as f64)
                ),
                redis: if pct == "p50" {
                    format!(
                        "{} (lease + commit: 2 round trips; server {:+.0} bytes per drain)",
                        fmt_ns(redis),
                        r.get("drain", "redis", "server_bytes_per_drain")
                            .unwrap_or(f64::NAN)
                    )
                } else {
                    format!("{} (lease + commit: 2 round trips)", fmt_ns(redis))
                },
                ours: format!("{} (`Periodic`)", fmt_ns(ours)),
                sled: format!("{} (scan + remove)", fmt_ns(r.get("drain", "sled", pct))),
                sqlite: format!("{} (NORMAL)", fmt_ns(sqlite)),
                ratio: format!(
                    "{} SQLite, {} ours on sled",
                    fmt_ratio(ratio(redis, sqlite)),
                    fmt_ratio(ratio(redis, ours))
                ),
                goal: if pct == "p99" {
                    "(≤ 1.0× SQLite is for an in-process store)".into()
                } else {
                    "(report)".into()
                },
                met: None,
            });
        }
    }
    if r.has("empty") {
        for pct in ["p50", "p99"] {
            let redis = r.get("empty", "redis", pct);
            let ours = r.get("empty", "ours", pct);
            let sqlite = r.get("empty", "sqlite", pct);
            rows.push(RedisRow {
                workload: format!(
                    "`get_messages`, empty queue, {pct} (a bulk to {} other users pending)",
                    group(n as f64)
                ),
                redis: format!("{} (1 round trip)", fmt_ns(redis)),
                ours: fmt_ns(ours),
                sled: format!("{} (scan_prefix)", fmt_ns(r.get("empty", "sled", pct))),
                sqlite: format!("{} (SELECT)", fmt_ns(sqlite)),
                ratio: format!(
                    "{} SQLite, {} ours on sled",
                    fmt_ratio(ratio(redis, sqlite)),
                    fmt_ratio(ratio(redis, ours))
                ),
                goal: if pct == "p50" {
                    "(≤ 1.0 µs is for an answer from memory)".into()
                } else {
                    "(report)".into()
                },
                met: None,
            });
        }
    }
    if r.has("durable") {
        let rate = |imp: &str, t: u64| r.get("durable", &format!("{imp}-{t}"), "rate");
        let sqlite_best = best(DURABLE_THREADS.map(|t| rate("sqlite", t)));
        let redis64 = rate("redis", 64);
        let vs_sqlite = ratio(redis64, sqlite_best);
        rows.push(RedisRow {
            workload: "durable sends, 64 threads (msgs/s)".into(),
            redis: format!("{} (`always`)", fmt_rate(redis64)),
            ours: format!("{} (`Immediate`)", fmt_rate(rate("ours", 64))),
            sled: format!("{} (+ fdatasync)", fmt_rate(rate("sledsync", 64))),
            sqlite: format!(
                "{} (FULL, 64 threads; best {})",
                fmt_rate(rate("sqlite", 64)),
                fmt_rate(sqlite_best)
            ),
            ratio: format!(
                "{} SQLite's best, {} ours on sled",
                fmt_ratio(vs_sqlite),
                fmt_ratio(ratio(redis64, rate("ours", 64)))
            ),
            goal: "≥ 10× SQLite FULL (its best thread count)".into(),
            met: Some(vs_sqlite.map(|x| x >= 10.0)),
        });
        let vs_one = ratio(redis64, rate("redis", 1));
        rows.push(RedisRow {
            workload: "… the same against one thread on Redis".into(),
            redis: format!(
                "{} (1 thread {})",
                fmt_rate(redis64),
                fmt_rate(rate("redis", 1))
            ),
            ours: format!(
                "{} (1 thread {})",
                fmt_rate(rate("ours", 64)),
                fmt_rate(rate("ours", 1))
            ),
            sled: "–".into(),
            sqlite: "–".into(),
            ratio: format!("{} 1 thread", fmt_ratio(vs_one)),
            goal: "≥ 5× 1 thread".into(),
            met: Some(vs_one.map(|x| x >= 5.0)),
        });
        rows.push(RedisRow {
            workload: "durable sends, 1 thread".into(),
            redis: format!("{} (`always`)", fmt_rate(rate("redis", 1))),
            ours: format!("{} (`Immediate`)", fmt_rate(rate("ours", 1))),
            sled: format!("{} (+ fdatasync)", fmt_rate(rate("sledsync", 1))),
            sqlite: format!("{} (FULL)", fmt_rate(rate("sqlite", 1))),
            ratio: format!(
                "{} SQLite, {} ours on sled",
                fmt_ratio(ratio(rate("redis", 1), rate("sqlite", 1))),
                fmt_ratio(ratio(rate("redis", 1), rate("ours", 1)))
            ),
            goal: "(report)".into(),
            met: None,
        });
    }
    if r.has("single") {
        let redis = r.get("single", "redis", "rate");
        let sled = r.get("single", "sled", "rate");
        rows.push(RedisRow {
            workload: format!(
                "single sends, 1 thread, {} msgs",
                group(sizes.single_sends as f64)
            ),
            redis: format!("{} (everysec; 1 round trip each)", fmt_rate(redis)),
            ours: format!("{} (`Periodic`)", fmt_rate(r.get("single", "ours", "rate"))),
            sled: fmt_rate(sled),
            sqlite: format!("{} (NORMAL)", fmt_rate(r.get("single", "sqlite", "rate"))),
            ratio: format!(
                "{} raw sled, {} ours on sled",
                fmt_ratio(ratio(redis, sled)),
                fmt_ratio(ratio(redis, r.get("single", "ours", "rate")))
            ),
            goal: "(≥ 0.8× raw sled is for an in-process store)".into(),
            met: None,
        });
    }
    rows
}

// ----------------------------------------------------------------- child --

fn child(workload: &str, imp: &str, n: u64, sizes: &Sizes) -> Res<Report> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mut report = Report::new();
    match workload {
        "bulk" => bulk(dir, imp, n, &mut report)?,
        "disk" => disk(dir, imp, n, &mut report)?,
        "drain" => drain(dir, imp, n, sizes, &mut report)?,
        "empty" => empty(dir, imp, n, sizes, &mut report)?,
        "durable" => durable(dir, imp, n, &mut report)?,
        "single" => single(dir, imp, n, &mut report)?,
        _ => return Err(format!("unknown workload {workload}").into()),
    }
    report.insert("hwm_kb".into(), status_kb("VmHWM"));
    Ok(report)
}

fn status_kb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Records the idle RSS, then resets the peak (`VmHWM`) to the current RSS,
/// so that the next `VmHWM` reading is the peak of what follows.
fn idle(report: &mut Report) {
    report.insert("idle_kb".into(), status_kb("VmRSS"));
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    report.insert("hwm_reset".into(), f64::from(u8::from(reset)));
}

fn timed(report: &mut Report, n: u64, work: impl FnOnce() -> Res<()>) -> Res<()> {
    let started = Instant::now();
    work()?;
    let secs = started.elapsed().as_secs_f64();
    report.insert("secs".into(), secs);
    report.insert("rate".into(), n as f64 / secs);
    Ok(())
}

/// `du`: allocated bytes of every file under `dir`.
fn du(dir: &Path) -> Res<f64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0_u64;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += du(&entry.path())? as u64;
        } else {
            total += meta.blocks() * 512;
        }
    }
    Ok(total as f64)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn percentiles(report: &mut Report, mut ns: Vec<u64>) {
    ns.sort_unstable();
    let at = |p: f64| ns[((ns.len() as f64 * p) as usize).min(ns.len() - 1)] as f64;
    report.insert("p50".into(), at(0.50));
    report.insert("p99".into(), at(0.99));
    report.insert("p999".into(), at(0.999));
    report.insert("max".into(), at(1.0));
}

/// Visits 0..n in a scattered order (a multiplicative permutation), so that
/// reads do not walk the key space in order.
fn scattered(n: u64) -> impl Iterator<Item = u64> {
    const STEP: u64 = 2_654_435_761; // prime
    let step = STEP % n.max(1);
    let step = if gcd(step, n) == 1 { step } else { 1 };
    (0..n).map(move |i| (i * step) % n)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn periodic() -> Durability {
    Durability::Periodic(Duration::from_millis(500))
}

/// `COMPARE_CACHE_BYTES` overrides the cache size of all three (for
/// investigating memory; the table uses `CACHE_BYTES`).
fn cache_bytes() -> Res<u64> {
    match std::env::var("COMPARE_CACHE_BYTES") {
        Ok(bytes) => Ok(bytes.parse()?),
        Err(_) => Ok(CACHE_BYTES),
    }
}

/// Opens our store in `dir/store`.
fn ours(dir: &Path, durability: Durability) -> Res<MessageStore> {
    Ok(MessageStore::builder()
        .path(dir.join("store"))
        .durability(durability)
        .cache_bytes(cache_bytes()?)
        .open()?)
}

/// A `redis-server` of this child (`appendfsync always` for an impl named
/// `…-always`, else `everysec`) and our store on it.
fn redis_store(imp: &str) -> Res<(RedisServer, MessageStore)> {
    let policy = if imp.ends_with("-always") {
        "always"
    } else {
        "everysec"
    };
    let server = RedisServer::builder().appendfsync(policy).start();
    let store = MessageStore::builder()
        .redis(server.url())
        .namespace(REDIS_NAMESPACE)
        .open()?;
    Ok((server, store))
}

/// One numeric field of the server's `INFO section` (NaN if absent).
fn server_info(server: &RedisServer, section: &str, field: &str) -> f64 {
    server
        .command(&["INFO", section])
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// What tests/common/redis.rs reports through `super::` when
/// `redis-server` is missing (its `start_or_skip`; the bench checks first).
#[allow(dead_code)]
fn missing_prerequisite(reason: &str) {
    eprintln!("{reason}");
}

/// `redis-server --version`'s version (`7.0.15`), or `?`.
fn redis_version() -> String {
    redis_server::redis_server_path()
        .and_then(|path| Command::new(path).arg("--version").output().ok())
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .find_map(|word| word.strip_prefix("v="))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into())
}

// ------------------------------------------------------------- raw sled --

/// Raw sled as an expert would use it for this job (see the file's docs).
#[derive(Clone)]
struct Sled {
    db: sled::Db,
    inbox: sled::Tree,
    texts: sled::Tree,
    remaining: sled::Tree,
}

impl Sled {
    /// Opens raw sled in `dir/sled` with our cache size and sled's other
    /// defaults (LowSpace mode, a flush every 500 ms). A handle dropped a
    /// moment ago may still hold the lock: retries for a few seconds.
    fn open(dir: &Path) -> Res<Sled> {
        let config = sled::Config::new()
            .path(dir.join("sled"))
            .cache_capacity(cache_bytes()?);
        let mut tries = 0;
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(_) if tries < 300 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok(Sled {
            inbox: db.open_tree("inbox")?,
            texts: db.open_tree("texts")?,
            remaining: db.open_tree("remaining")?,
            db,
        })
    }

    /// sled 0.34's flush ends in sync_file_range(2), which flushes neither
    /// the drive's write cache nor file metadata; `fdatasync` of its data
    /// file on top is what makes a write power-safe (what ours and SQLite
    /// FULL do).
    fn data_file(dir: &Path) -> Res<std::fs::File> {
        Ok(std::fs::File::open(dir.join("sled").join("db"))?)
    }

    /// A direct message: the text inline under the user's key.
    fn direct(&self, user: u64, text: &str) -> Res<()> {
        let key = sled_key(user, self.db.generate_id()?);
        self.inbox.insert(key, sled_value(now_ms(), text))?;
        Ok(())
    }

    /// A bulk message: an empty value per recipient, then the text and the
    /// recipient count (the text is the commit point: a reader skips
    /// recipients whose text is missing).
    fn bulk(&self, users: impl Iterator<Item = u64>, text: &str) -> Res<u64> {
        let id = self.db.generate_id()?;
        let mut count = 0_u64;
        for user in users {
            self.inbox.insert(sled_key(user, id), &[] as &[u8])?;
            count += 1;
        }
        self.remaining
            .insert(id.to_be_bytes(), &count.to_be_bytes()[..])?;
        self.texts
            .insert(id.to_be_bytes(), sled_value(now_ms(), text))?;
        Ok(count)
    }

    /// A drain: scan the user's prefix, remove what was read, and remove a
    /// bulk text when its last recipient has taken it.
    fn drain(&self, user: u64) -> Res<Vec<sled::IVec>> {
        let mut out = Vec::new();
        for item in self.inbox.scan_prefix(user.to_be_bytes()) {
            let (key, value) = item?;
            if !value.is_empty() {
                self.inbox.remove(&key)?;
                out.push(value);
                continue;
            }
            let id = key.get(8..16).ok_or("short key")?;
            let Some(text) = self.texts.get(id)? else {
                continue; // not committed
            };
            self.inbox.remove(&key)?;
            out.push(text);
            let before = self.remaining.fetch_and_update(id, |count| {
                let count = u64::from_be_bytes(count?.try_into().ok()?);
                (count > 1).then(|| (count - 1).to_be_bytes().to_vec())
            })?;
            if before.as_deref() == Some(&1_u64.to_be_bytes()[..]) {
                self.texts.remove(id)?;
            }
        }
        Ok(out)
    }
}

fn sled_key(user: u64, seq: u64) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&user.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// What raw sled stores for a message: level, send time, text.
fn sled_value(sent_at: u64, text: &str) -> Vec<u8> {
    let mut value = Vec::with_capacity(9 + text.len());
    value.push(20);
    value.extend_from_slice(&sent_at.to_be_bytes());
    value.extend_from_slice(text.as_bytes());
    value
}

fn sled_text(value: &[u8]) -> &[u8] {
    value.get(9..).unwrap_or_default()
}

// --------------------------------------------------------------- SQLite --

/// SQLite as an expert would use it for this job (see the file's docs).
struct Lite {
    conn: Connection,
    /// Message ids, shared by direct and bulk messages (kept in memory, as
    /// sled's `generate_id` does).
    next_id: i64,
}

impl Lite {
    fn open(dir: &Path, synchronous: &str) -> Res<Lite> {
        let conn = Connection::open(dir.join("messages.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", synchronous)?;
        conn.pragma_update(None, "cache_size", -((cache_bytes()? >> 10) as i64))?;
        conn.busy_timeout(Duration::from_secs(60))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS texts (
                 id INTEGER PRIMARY KEY,
                 level INTEGER NOT NULL,
                 sent_at INTEGER NOT NULL,
                 text TEXT NOT NULL,
                 remaining INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS inbox (
                 user INTEGER NOT NULL,
                 id INTEGER NOT NULL,
                 level INTEGER,
                 sent_at INTEGER,
                 text TEXT,
                 PRIMARY KEY (user, id)) WITHOUT ROWID;",
        )?;
        let next_id = conn.query_row(
            "SELECT max((SELECT coalesce(max(id), 0) FROM texts),
                        (SELECT coalesce(max(id), 0) FROM inbox)) + 1",
            [],
            |row| row.get(0),
        )?;
        Ok(Lite { conn, next_id })
    }

    fn id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id - 1
    }

    /// A direct message: one inbox row with the text (autocommit).
    fn direct(&mut self, user: u64, text: &str) -> Res<()> {
        let id = self.id();
        self.conn
            .prepare_cached(
                "INSERT INTO inbox (user, id, level, sent_at, text) VALUES (?1, ?2, 20, ?3, ?4)",
            )?
            .execute(params![user as i64, id, now_ms() as i64, text])?;
        Ok(())
    }

    /// A bulk message in one transaction: the text once, one small inbox row
    /// per recipient.
    fn bulk(&mut self, users: impl Iterator<Item = u64>, text: &str) -> Res<u64> {
        let id = self.id();
        let tx = self.conn.transaction()?;
        let mut count = 0_u64;
        {
            let mut insert = tx.prepare_cached("INSERT INTO inbox (user, id) VALUES (?1, ?2)")?;
            for user in users {
                insert.execute(params![user as i64, id])?;
                count += 1;
            }
        }
        tx.prepare_cached(
            "INSERT INTO texts (id, level, sent_at, text, remaining) VALUES (?1, 20, ?2, ?3, ?4)",
        )?
        .execute(params![id, now_ms() as i64, text, count as i64])?;
        tx.commit()?;
        Ok(count)
    }

    /// A drain: a deferred transaction that only writes when it found
    /// something.
    fn drain(&mut self, user: u64) -> Res<Vec<(i64, i64, String)>> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)?;
        let rows = {
            let mut select = tx.prepare_cached(
                "SELECT i.id, coalesce(i.level, t.level), coalesce(i.sent_at, t.sent_at),
                        coalesce(i.text, t.text), i.text IS NULL
                 FROM inbox i LEFT JOIN texts t ON t.id = i.id
                 WHERE i.user = ?1 ORDER BY i.id",
            )?;
            select
                .query_map([user as i64], |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        (row.get(1)?, row.get(2)?, row.get(3)?),
                        row.get::<_, bool>(4)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?
        };
        if !rows.is_empty() {
            tx.prepare_cached("DELETE FROM inbox WHERE user = ?1")?
                .execute([user as i64])?;
            for (id, _, bulk) in &rows {
                if !bulk {
                    continue;
                }
                let left: Option<i64> = tx
                    .prepare_cached(
                        "UPDATE texts SET remaining = remaining - 1 WHERE id = ?1 RETURNING remaining",
                    )?
                    .query_row([id], |row| row.get(0))
                    .optional()?;
                if left == Some(0) {
                    tx.prepare_cached("DELETE FROM texts WHERE id = ?1")?
                        .execute([id])?;
                }
            }
        }
        tx.commit()?;
        Ok(rows.into_iter().map(|(_, message, _)| message).collect())
    }

    fn checkpoint(&self) -> Res<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}

// ------------------------------------------------------------ workloads --

/// One message to `n` users, durable when it returns; reports throughput
/// and the peak RSS of the send.
fn bulk(dir: &Path, imp: &str, n: u64, report: &mut Report) -> Res<()> {
    match imp {
        "ours" => {
            let store = ours(dir, Durability::Immediate)?;
            idle(report);
            timed(report, n, || {
                let sent = store.message_users(recipients(n), TEXT, Level::Info)?;
                assert_eq!(sent.recipients(), n);
                Ok(())
            })?;
        }
        "sled" => {
            let sled = Sled::open(dir)?;
            let file = Sled::data_file(dir)?;
            idle(report);
            timed(report, n, || {
                assert_eq!(sled.bulk(recipients(n), TEXT)?, n);
                sled.db.flush()?;
                file.sync_data()?;
                Ok(())
            })?;
        }
        "sqlite" => {
            let mut lite = Lite::open(dir, "FULL")?;
            idle(report);
            timed(report, n, || {
                assert_eq!(lite.bulk(recipients(n), TEXT)?, n);
                Ok(())
            })?;
        }
        "redis" | "redis-always" => {
            let (server, store) = redis_store(imp)?;
            let used_before = server_info(&server, "memory", "used_memory");
            idle(report);
            timed(report, n, || {
                let sent = store.message_users(recipients(n), TEXT, Level::Info)?;
                assert_eq!(sent.recipients(), n);
                Ok(())
            })?;
            report.insert("send_hwm_kb".into(), status_kb("VmHWM"));
            report.insert(
                "server_bytes".into(),
                server_info(&server, "memory", "used_memory") - used_before,
            );
            report.insert(
                "aof_bytes".into(),
                du(&server.dir().join("appendonlydir")).unwrap_or(f64::NAN),
            );
            return Ok(());
        }
        _ => return Err(format!("unknown impl {imp}").into()),
    }
    report.insert("send_hwm_kb".into(), status_kb("VmHWM"));
    Ok(())
}

/// Disk use of an empty store, after a bulk send to `n` users, after
/// draining every one of them, and after closing and reopening (all with
/// the no-fsync class, flushed before each reading).
fn disk(dir: &Path, imp: &str, n: u64, report: &mut Report) -> Res<()> {
    let mut record = |key: &str, value: f64| report.insert(key.into(), value);
    match imp {
        "ours" => {
            let path = dir.join("store");
            {
                let store = ours(dir, periodic())?;
                store.flush()?;
                record("empty_bytes", du(&path)?);
                record("sod_empty", store.size_on_disk()? as f64);
                store.message_users(recipients(n), TEXT, Level::Info)?;
                store.flush()?;
                record("full_bytes", du(&path)?);
                record("sod_full", store.size_on_disk()? as f64);
                let drain_started = Instant::now();
                for user in recipients(n) {
                    assert_eq!(store.get_messages(user)?.len(), 1);
                }
                record(
                    "drain_rate",
                    n as f64 / drain_started.elapsed().as_secs_f64(),
                );
                store.flush()?;
                record("drained_bytes", du(&path)?);
                record("sod_drained", store.size_on_disk()? as f64);
            }
            let store = ours(dir, periodic())?;
            store.flush()?;
            record("reopened_bytes", du(&path)?);
        }
        "sled" => {
            let path = dir.join("sled");
            {
                let sled = Sled::open(dir)?;
                sled.db.flush()?;
                record("empty_bytes", du(&path)?);
                sled.bulk(recipients(n), TEXT)?;
                sled.db.flush()?;
                record("full_bytes", du(&path)?);
                let drain_started = Instant::now();
                for user in recipients(n) {
                    assert_eq!(sled.drain(user)?.len(), 1);
                }
                record(
                    "drain_rate",
                    n as f64 / drain_started.elapsed().as_secs_f64(),
                );
                sled.db.flush()?;
                record("drained_bytes", du(&path)?);
            }
            let sled = Sled::open(dir)?;
            sled.db.flush()?;
            record("reopened_bytes", du(&path)?);
        }
        "sqlite" => {
            {
                let mut lite = Lite::open(dir, "NORMAL")?;
                lite.checkpoint()?;
                record("empty_bytes", du(dir)?);
                lite.bulk(recipients(n), TEXT)?;
                lite.checkpoint()?;
                record("full_bytes", du(dir)?);
                let drain_started = Instant::now();
                for user in recipients(n) {
                    assert_eq!(lite.drain(user)?.len(), 1);
                }
                record(
                    "drain_rate",
                    n as f64 / drain_started.elapsed().as_secs_f64(),
                );
                lite.checkpoint()?;
                record("drained_bytes", du(dir)?);
            }
            let lite = Lite::open(dir, "NORMAL")?;
            lite.checkpoint()?;
            record("reopened_bytes", du(dir)?);
        }
        _ => return Err(format!("unknown impl {imp}").into()),
    }
    Ok(())
}

/// A bulk send to `n` users, then a direct message to `samples` of them
/// (spread over the recipients); then each of those drained once, in
/// scattered order, each drain timed (it returns the bulk message, then the
/// direct one).
fn drain(dir: &Path, imp: &str, n: u64, sizes: &Sizes, report: &mut Report) -> Res<()> {
    let samples = if imp.ends_with("-durable") || imp.ends_with("-full") {
        sizes.durable_samples
    } else {
        sizes.samples
    }
    .min(n);
    let stride = n / samples;
    let sampled = |k: u64| recipient(k * stride);
    let mut ns = Vec::with_capacity(samples as usize);
    let mut time = |drain: &mut dyn FnMut(u64) -> Res<(usize, bool)>| -> Res<()> {
        for k in scattered(samples) {
            let t = Instant::now();
            let (count, bulk_first) = drain(sampled(k))?;
            ns.push(t.elapsed().as_nanos() as u64);
            assert_eq!(count, 2);
            assert!(bulk_first, "the bulk message comes first");
        }
        Ok(())
    };
    match imp {
        "ours" | "ours-durable" => {
            let durability = if imp == "ours" {
                periodic()
            } else {
                Durability::Immediate
            };
            let store = ours(dir, durability)?;
            store.message_users(recipients(n), TEXT, Level::Info)?;
            for k in 0..samples {
                store.message_user(sampled(k), DIRECT, Level::Info)?;
            }
            time(&mut |user| {
                let got = store.get_messages(user)?;
                Ok((got.len(), got.first().is_some_and(|m| m.text() == TEXT)))
            })?;
        }
        "sled" => {
            let sled = Sled::open(dir)?;
            sled.bulk(recipients(n), TEXT)?;
            for k in 0..samples {
                sled.direct(sampled(k), DIRECT)?;
            }
            time(&mut |user| {
                let got = sled.drain(user)?;
                Ok((
                    got.len(),
                    got.first().is_some_and(|v| sled_text(v) == TEXT.as_bytes()),
                ))
            })?;
        }
        "sqlite" | "sqlite-full" => {
            let mut lite = Lite::open(dir, if imp == "sqlite" { "NORMAL" } else { "FULL" })?;
            lite.bulk(recipients(n), TEXT)?;
            // Setup, not timed: one transaction.
            lite.conn.execute_batch("BEGIN")?;
            for k in 0..samples {
                lite.direct(sampled(k), DIRECT)?;
            }
            lite.conn.execute_batch("COMMIT")?;
            time(&mut |user| {
                let got = lite.drain(user)?;
                Ok((got.len(), got.first().is_some_and(|m| m.2 == TEXT)))
            })?;
        }
        "redis" => {
            let (server, store) = redis_store(imp)?;
            store.message_users(recipients(n), TEXT, Level::Info)?;
            for k in 0..samples {
                store.message_user(sampled(k), DIRECT, Level::Info)?;
            }
            let used_before = server_info(&server, "memory", "used_memory");
            time(&mut |user| {
                let got = store.get_messages(user)?;
                Ok((got.len(), got.first().is_some_and(|m| m.text() == TEXT)))
            })?;
            // What each drain leaves on the server (taken marks, commit
            // marks), net of the direct message it removed.
            report.insert(
                "server_bytes_per_drain".into(),
                (server_info(&server, "memory", "used_memory") - used_before) / samples as f64,
            );
        }
        _ => return Err(format!("unknown impl {imp}").into()),
    }
    percentiles(report, ns);
    Ok(())
}

/// A bulk send to `n` users, then timed drains of users who have nothing
/// queued (the users left out of the send, among its recipients' ids).
fn empty(dir: &Path, imp: &str, n: u64, sizes: &Sizes, report: &mut Report) -> Res<()> {
    let outsiders = (n / 4).max(1);
    let samples = sizes.samples.min(outsiders);
    let probes = || scattered(outsiders).take(samples as usize).map(outsider);
    let mut ns = Vec::with_capacity(samples as usize);
    let mut time = |drain: &mut dyn FnMut(u64) -> Res<usize>| -> Res<()> {
        for user in probes() {
            let t = Instant::now();
            let got = drain(user)?;
            ns.push(t.elapsed().as_nanos() as u64);
            assert_eq!(got, 0);
        }
        Ok(())
    };
    match imp {
        "ours" => {
            let store = ours(dir, periodic())?;
            store.message_users(recipients(n), TEXT, Level::Info)?;
            time(&mut |user| Ok(store.get_messages(user)?.len()))?;
        }
        "sled" => {
            let sled = Sled::open(dir)?;
            sled.bulk(recipients(n), TEXT)?;
            time(&mut |user| Ok(sled.drain(user)?.len()))?;
        }
        "sqlite" => {
            let mut lite = Lite::open(dir, "NORMAL")?;
            lite.bulk(recipients(n), TEXT)?;
            time(&mut |user| Ok(lite.drain(user)?.len()))?;
        }
        "redis" => {
            let (_server, store) = redis_store(imp)?;
            store.message_users(recipients(n), TEXT, Level::Info)?;
            time(&mut |user| Ok(store.get_messages(user)?.len()))?;
        }
        _ => return Err(format!("unknown impl {imp}").into()),
    }
    percentiles(report, ns);
    Ok(())
}

/// Direct sends that are on disk when they return, from a number of threads
/// (`IMPL-THREADS`), for `ms` milliseconds; reports sends per second.
fn durable(dir: &Path, imp: &str, ms: u64, report: &mut Report) -> Res<()> {
    let (name, threads) = imp.split_once('-').ok_or("impl-threads")?;
    let threads: u64 = threads.parse()?;
    let done = Arc::new(AtomicU64::new(0));
    let mut _server = None;
    // Opening happens before the clock starts.
    enum Target {
        Ours(MessageStore),
        Sled(Sled, std::fs::File, bool),
        Lite(Mutex<Lite>),
    }
    let target = match name {
        "ours" => Target::Ours(ours(dir, Durability::Immediate)?),
        "sled" | "sledsync" => {
            Target::Sled(Sled::open(dir)?, Sled::data_file(dir)?, name == "sledsync")
        }
        "sqlite" => Target::Lite(Mutex::new(Lite::open(dir, "FULL")?)),
        "redis" => {
            let (server, store) = redis_store("redis-always")?;
            _server = Some(server);
            Target::Ours(store)
        }
        _ => return Err(format!("unknown impl {imp}").into()),
    };
    let send = |user: u64| -> Res<()> {
        match &target {
            Target::Ours(store) => {
                store.message_user(user, DIRECT, Level::Info)?;
            }
            Target::Sled(sled, file, sync) => {
                sled.direct(user, DIRECT)?;
                sled.db.flush()?;
                if *sync {
                    file.sync_data()?;
                }
            }
            Target::Lite(lite) => lite.lock().direct(user, DIRECT)?,
        }
        Ok(())
    };
    let started = Instant::now();
    let deadline = started + Duration::from_millis(ms);
    std::thread::scope(|s| -> Res<()> {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (send, done) = (&send, &done);
                s.spawn(move || -> Result<(), String> {
                    let mut i = 0;
                    while Instant::now() < deadline {
                        send(t << 32 | i).map_err(|e| e.to_string())?;
                        i += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "thread panicked")??;
        }
        Ok(())
    })?;
    let secs = started.elapsed().as_secs_f64();
    report.insert("sends".into(), done.load(Ordering::Relaxed) as f64);
    report.insert("rate".into(), done.load(Ordering::Relaxed) as f64 / secs);
    Ok(())
}

/// `n` direct sends from one thread to `n` users, none fsynced.
fn single(dir: &Path, imp: &str, n: u64, report: &mut Report) -> Res<()> {
    match imp {
        "ours" => {
            let store = ours(dir, periodic())?;
            timed(report, n, || {
                for user in 0..n {
                    store.message_user(user, DIRECT, Level::Info)?;
                }
                Ok(())
            })?;
        }
        "sled" => {
            let sled = Sled::open(dir)?;
            timed(report, n, || {
                for user in 0..n {
                    sled.direct(user, DIRECT)?;
                }
                Ok(())
            })?;
        }
        "sqlite" => {
            let mut lite = Lite::open(dir, "NORMAL")?;
            timed(report, n, || {
                for user in 0..n {
                    lite.direct(user, DIRECT)?;
                }
                Ok(())
            })?;
        }
        "redis" => {
            let (_server, store) = redis_store(imp)?;
            timed(report, n, || {
                for user in 0..n {
                    store.message_user(user, DIRECT, Level::Info)?;
                }
                Ok(())
            })?;
        }
        _ => return Err(format!("unknown impl {imp}").into()),
    }
    Ok(())
}
