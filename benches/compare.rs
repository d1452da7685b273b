//! async-messages against raw sled 0.34.7 and SQLite (rusqlite, bundled, WAL),
//! every workload of issue 4, in one run, printed as one Markdown table.
//!
//! ```text
//! cargo bench --bench compare              # full run (1,000,000 users), for README
//! cargo bench --bench compare -- --quick   # smoke run, seconds
//! cargo bench --bench compare -- --only drain   # one workload (bulk empty drain durable single disk)
//! ```
//!
//! Every (workload, implementation) pair runs in its own child process (this
//! binary, re-invoked as `--child WORKLOAD IMPL N`), so each one starts from a
//! fresh heap and its peak RSS (`VmHWM` from `/proc/self/status`) is its own.
//! The child also reports its idle `VmRSS` after opening the database and
//! before the work; "peak above idle" is `VmHWM - idle VmRSS`. Each child
//! works in its own temporary directory, removed when it exits.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_messages::{Durability, Level, MessageStore};
use rusqlite::{Connection, TransactionBehavior, params};

type Res<T> = Result<T, Box<dyn std::error::Error>>;
type Report = BTreeMap<String, f64>;

/// The text every workload sends (70 bytes).
const TEXT: &str = "Your export of 2026-11-26 is ready: download it from the reports page.";
/// Bytes of a user id in the payload definition (a u64).
const USER_ID_BYTES: u64 = 8;
/// User ids that are never messaged (the empty-queue workload).
const NEVER: u64 = 1 << 40;

/// Sizes for one run.
struct Sizes {
    /// Users of the bulk send and the disk workload.
    bulk_users: u64,
    /// Timed calls in the latency workloads.
    samples: u64,
    /// Users with queued messages while the empty queue is measured.
    background_users: u64,
    /// Milliseconds each durable-send configuration runs.
    durable_ms: u64,
    /// Sends in the single-send workload.
    single_sends: u64,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                bulk_users: 20_000,
                samples: 5_000,
                background_users: 5_000,
                durable_ms: 500,
                single_sends: 20_000,
            }
        } else {
            Sizes {
                bulk_users: 1_000_000,
                samples: 100_000,
                background_users: 100_000,
                durable_ms: 3_000,
                single_sends: 200_000,
            }
        }
    }
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(at) = args.iter().position(|a| a == "--child") {
        let workload = args.get(at + 1).ok_or("--child WORKLOAD IMPL N")?;
        let imp = args.get(at + 2).ok_or("--child WORKLOAD IMPL N")?;
        let n: u64 = args.get(at + 3).ok_or("--child WORKLOAD IMPL N")?.parse()?;
        let report = child(workload, imp, n)?;
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
    parent(quick, only.as_deref())
}

// ---------------------------------------------------------------- parent --

fn run_child(workload: &str, imp: &str, n: u64) -> Res<Report> {
    let started = Instant::now();
    let output = Command::new(std::env::current_exe()?)
        .args(["--child", workload, imp, &n.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()?;
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
        "  {workload:>7} {imp:<13} n={n:<9} {:>6.1} s  {}",
        started.elapsed().as_secs_f64(),
        report
            .iter()
            .map(|(k, v)| format!("{k}={v:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(report)
}

/// Runs of each short workload (their median is reported).
const REPEATS: usize = 3;

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
}

fn parent(quick: bool, only: Option<&str>) -> Res<()> {
    let sizes = Sizes::new(quick);
    let plan: Vec<(&str, &[&str], u64)> = vec![
        (
            "bulk",
            &["ours", "sled-inserts", "sled-batches", "sqlite"],
            sizes.bulk_users,
        ),
        ("empty", &["ours", "sled", "sqlite"], sizes.samples),
        (
            "drain",
            &["ours", "ours-durable", "sled", "sqlite"],
            sizes.samples,
        ),
        (
            "durable",
            &[
                "ours-1",
                "ours-8",
                "sled-1",
                "sled-8",
                "sledsync-1",
                "sqlite-1",
                "sqlite-8",
            ],
            sizes.durable_ms,
        ),
        ("single", &["ours", "sled", "sqlite"], sizes.single_sends),
        (
            "disk",
            &["ours", "ours-each", "sled", "sqlite"],
            sizes.bulk_users,
        ),
    ];
    eprintln!(
        "compare: {} mode; each line is one child process",
        if quick { "quick" } else { "full" }
    );
    let load_before = loadavg();
    let started = Instant::now();
    let mut results = Results(BTreeMap::new());
    for (workload, imps, n) in plan {
        if only.is_some_and(|o| o != workload) {
            continue;
        }
        // Short workloads run REPEATS times, implementations interleaved,
        // and report the median of each figure: one busy moment on a shared
        // machine then moves no ratio.
        let repeats = if matches!(workload, "bulk" | "disk") {
            1
        } else {
            REPEATS
        };
        let mut runs: BTreeMap<&str, Vec<Report>> = BTreeMap::new();
        for _ in 0..repeats {
            for imp in imps {
                runs.entry(imp)
                    .or_default()
                    .push(run_child(workload, imp, n)?);
            }
        }
        for (imp, reports) in runs {
            results
                .0
                .insert(format!("{workload}/{imp}"), median(&reports));
        }
    }
    print_table(&results, &sizes);
    println!(
        "Run: {:.0} s; load average (1 min) before {load_before}, after {} (on {} CPUs).",
        started.elapsed().as_secs_f64(),
        loadavg(),
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    Ok(())
}

/// The 1-minute load average, to tell a quiet machine from a busy one.
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

fn fmt_mb(kb: Option<f64>) -> String {
    kb.map_or("–".into(), |kb| format!("{:.1} MB", kb / 1024.0))
}

fn fmt_bytes(bytes: Option<f64>, payload: f64) -> String {
    bytes.map_or("–".into(), |b| {
        format!("{:.1} MB ({:.2}×)", b / 1_000_000.0, b / payload)
    })
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| format!("{r:.2}×"))
}

fn met(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "**met**",
        Some(false) => "**missed**",
        None => "–",
    }
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

fn print_table(r: &Results, sizes: &Sizes) {
    let n = sizes.bulk_users;
    let rows = table_rows(r, sizes);
    println!();
    println!(
        "| workload | async-messages | raw sled 0.34.7 | SQLite | ours / sled | ours / SQLite | goal | |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("| {} |", row.join(" | "));
    }
    let payload = n * (USER_ID_BYTES + TEXT.len() as u64);
    println!();
    println!(
        "Payload = {n} messages × ({USER_ID_BYTES} bytes of user id + {} bytes of text) = {} bytes. \
         Disk = `du` of the database directory (allocated blocks, st_blocks × 512) after a flush; \
         SQLite: the .db, -wal and -shm files.",
        TEXT.len(),
        group(payload as f64)
    );
    println!(
        "Ratios are ours / baseline: above 1 is better for throughput, below 1 is better for latency, memory and disk. \
         Bulk and disk rows: one run each; the other rows: the median of {REPEATS} runs, implementations interleaved."
    );
}

fn table_rows(r: &Results, sizes: &Sizes) -> Vec<Vec<String>> {
    let n = sizes.bulk_users;
    let mut rows = Vec::new();

    // Bulk send.
    if r.0.contains_key("bulk/ours") {
        let ours = r.get("bulk", "ours", "rate");
        let ins = r.get("bulk", "sled-inserts", "rate");
        let bat = r.get("bulk", "sled-batches", "rate");
        let (sled, how) = if ins.unwrap_or(0.0) >= bat.unwrap_or(0.0) {
            (ins, "individual inserts")
        } else {
            (bat, "8,192-insert batches")
        };
        let sqlite = r.get("bulk", "sqlite", "rate");
        let vs_sled = ratio(ours, sled);
        let vs_sqlite = ratio(ours, sqlite);
        rows.push(vec![
            format!(
                "`message_users` to {} users, one text (msgs/s)",
                group(n as f64)
            ),
            fmt_rate(ours),
            format!(
                "{} (best of: inserts {}, batches {})",
                fmt_rate(sled),
                fmt_rate(ins),
                fmt_rate(bat)
            ),
            format!("{} (1 transaction)", fmt_rate(sqlite)),
            fmt_ratio(vs_sled),
            fmt_ratio(vs_sqlite),
            format!("≥ 1.0× sled ({how}); aim ≥ 1.0× SQLite"),
            format!(
                "floor {}, aim {}",
                met(vs_sled.map(|x| x >= 1.0)),
                met(vs_sqlite.map(|x| x >= 1.0))
            ),
        ]);
        let above =
            |imp: &str| Some(r.get("bulk", imp, "hwm_kb")? - r.get("bulk", imp, "idle_kb")?);
        let ours_above = above("ours");
        let sled_above = if how == "individual inserts" {
            above("sled-inserts")
        } else {
            above("sled-batches")
        };
        rows.push(vec![
            "peak RSS above idle during that send".into(),
            format!(
                "{} (idle {})",
                fmt_mb(ours_above),
                fmt_mb(r.get("bulk", "ours", "idle_kb"))
            ),
            format!(
                "{} (inserts {}, batches {})",
                fmt_mb(sled_above),
                fmt_mb(above("sled-inserts")),
                fmt_mb(above("sled-batches"))
            ),
            fmt_mb(above("sqlite")),
            fmt_ratio(ratio(ours_above, sled_above)),
            fmt_ratio(ratio(ours_above, above("sqlite"))),
            "≤ 64 MB".into(),
            met(ours_above.map(|kb| kb <= 64.0 * 1024.0)).into(),
        ]);
    }

    // Empty queue.
    if r.0.contains_key("empty/ours") {
        for (pct, limit) in [("p50", 1000.0), ("p99", 5000.0)] {
            let ours = r.get("empty", "ours", pct);
            let sled = r.get("empty", "sled", pct);
            let sqlite = r.get("empty", "sqlite", pct);
            rows.push(vec![
                format!(
                    "`get_messages`, empty queue, {pct} ({} other users queued)",
                    group(sizes.background_users as f64)
                ),
                fmt_ns(ours),
                format!("{} (scan_prefix)", fmt_ns(sled)),
                format!("{} (SELECT in a transaction)", fmt_ns(sqlite)),
                fmt_ratio(ratio(ours, sled)),
                fmt_ratio(ratio(ours, sqlite)),
                format!("≤ {}", fmt_ns(Some(limit))),
                met(ours.map(|v| v <= limit)).into(),
            ]);
        }
    }

    // Drain with 1–3 queued.
    if r.0.contains_key("drain/ours") {
        for pct in ["p50", "p99"] {
            let ours = r.get("drain", "ours", pct);
            let sled = r.get("drain", "sled", pct);
            let sqlite = r.get("drain", "sqlite", pct);
            let vs = ratio(ours, sqlite);
            rows.push(vec![
                format!("`get_messages`, 1–3 queued, {pct} (`Periodic`; SQLite NORMAL)"),
                fmt_ns(ours),
                format!("{} (scan + remove)", fmt_ns(sled)),
                format!("{} (SELECT + DELETE in a transaction)", fmt_ns(sqlite)),
                fmt_ratio(ratio(ours, sled)),
                fmt_ratio(vs),
                if pct == "p99" {
                    "≤ 1.0× SQLite".into()
                } else {
                    "(for reference)".into()
                },
                if pct == "p99" {
                    met(vs.map(|x| x <= 1.0)).into()
                } else {
                    "".into()
                },
            ]);
        }
        let durable = r.get("drain", "ours-durable", "p99");
        rows.push(vec![
            "`get_messages`, 1–3 queued, p99, `Immediate` (fsync per drain)".into(),
            fmt_ns(durable),
            "–".into(),
            "–".into(),
            "–".into(),
            fmt_ratio(ratio(durable, r.get("drain", "sqlite", "p99"))),
            "(for reference)".into(),
            "".into(),
        ]);
    }

    // Durable sends.
    if r.0.contains_key("durable/ours-8") {
        let ours8 = r.get("durable", "ours-8", "rate");
        let ours1 = r.get("durable", "ours-1", "rate");
        let sled1 = r.get("durable", "sled-1", "rate");
        let sled8 = r.get("durable", "sled-8", "rate");
        let best_sled = match (sled1, sled8) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let sqlite1 = r.get("durable", "sqlite-1", "rate");
        let sqlite8 = r.get("durable", "sqlite-8", "rate");
        let vs = ratio(ours8, best_sled);
        rows.push(vec![
            "durable sends, 8 threads (msgs/s; ours `Immediate`)".into(),
            format!("{} (1 thread: {})", fmt_rate(ours8), fmt_rate(ours1)),
            format!(
                "insert + flush each: 8 threads {}, 1 thread {} (+ fdatasync: {})",
                fmt_rate(sled8),
                fmt_rate(sled1),
                fmt_rate(r.get("durable", "sledsync-1", "rate"))
            ),
            format!(
                "FULL, autocommit: 8 threads {}, 1 thread {}",
                fmt_rate(sqlite8),
                fmt_rate(sqlite1)
            ),
            format!(
                "{} (vs 1 thread {})",
                fmt_ratio(vs),
                fmt_ratio(ratio(ours8, sled1))
            ),
            fmt_ratio(ratio(ours8, sqlite8)),
            "≥ 10× sled (the faster of 1 and 8 threads)".into(),
            met(vs.map(|x| x >= 10.0)).into(),
        ]);
    }

    // Single sends.
    if r.0.contains_key("single/ours") {
        let ours = r.get("single", "ours", "rate");
        let sled = r.get("single", "sled", "rate");
        let sqlite = r.get("single", "sqlite", "rate");
        let vs = ratio(ours, sled);
        rows.push(vec![
            format!(
                "single sends, 1 thread, {} msgs (ours `Periodic`)",
                group(sizes.single_sends as f64)
            ),
            fmt_rate(ours),
            format!("{} (generate_id + insert)", fmt_rate(sled)),
            format!("{} (NORMAL, autocommit)", fmt_rate(sqlite)),
            fmt_ratio(vs),
            fmt_ratio(ratio(ours, sqlite)),
            "≥ 0.8× sled".into(),
            met(vs.map(|x| x >= 0.8)).into(),
        ]);
    }

    // Disk.
    if r.0.contains_key("disk/ours") {
        let payload = (n * (USER_ID_BYTES + TEXT.len() as u64)) as f64;
        for (key, label) in [
            (
                "full_bytes",
                format!("disk after {} messages", group(n as f64)),
            ),
            ("drained_bytes", "disk after all are drained".into()),
            ("reopened_bytes", "… and after close + reopen".into()),
        ] {
            let ours = r.get("disk", "ours", key);
            let each = r.get("disk", "ours-each", key);
            let sled = r.get("disk", "sled", key);
            let sqlite = r.get("disk", "sqlite", key);
            let goal = key == "full_bytes";
            rows.push(vec![
                format!("{label} (`message_users`; in brackets: × payload)"),
                format!(
                    "{}; sent one by one: {}",
                    fmt_bytes(ours, payload),
                    fmt_bytes(each, payload)
                ),
                fmt_bytes(sled, payload),
                fmt_bytes(sqlite, payload),
                fmt_ratio(ratio(ours, sled)),
                fmt_ratio(ratio(ours, sqlite)),
                if goal {
                    "≤ 1.5× payload".into()
                } else {
                    "space reclaimed (report)".into()
                },
                if goal {
                    format!(
                        "{} (one by one: {})",
                        met(ours.map(|b| b <= 1.5 * payload)),
                        met(each.map(|b| b <= 1.5 * payload))
                    )
                } else {
                    let full = r.get("disk", "ours", "full_bytes");
                    met(ours.zip(full).map(|(d, f)| d < f)).into()
                },
            ]);
        }
        let sod = r.get("disk", "ours", "size_on_disk_full");
        rows.push(vec![
            "`store.size_on_disk()` after the send / after draining".into(),
            format!(
                "{} / {}",
                fmt_bytes(sod, payload),
                fmt_bytes(r.get("disk", "ours", "size_on_disk_drained"), payload)
            ),
            "–".into(),
            "–".into(),
            "–".into(),
            "–".into(),
            "(for reference)".into(),
            "".into(),
        ]);
    }
    rows
}

// ----------------------------------------------------------------- child --

fn status_kb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
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

/// Opens our store. `COMPARE_CACHE_BYTES` overrides `Builder::cache_bytes`
/// (for investigating memory; the table uses the default).
fn ours(dir: &Path, durability: Durability) -> Res<MessageStore> {
    let mut builder = MessageStore::builder()
        .path(dir.join("store"))
        .durability(durability);
    if let Ok(bytes) = std::env::var("COMPARE_CACHE_BYTES") {
        builder = builder.cache_bytes(bytes.parse()?);
    }
    Ok(builder.open()?)
}

/// Opens raw sled with its defaults (LowSpace mode, 1 GB cache, flush every
/// 500 ms). `COMPARE_SLED_CACHE_BYTES` overrides the cache size.
fn sled_open(dir: &Path) -> Res<sled::Db> {
    let mut config = sled::Config::new().path(dir.join("sled"));
    if let Ok(bytes) = std::env::var("COMPARE_SLED_CACHE_BYTES") {
        config = config.cache_capacity(bytes.parse()?);
    }
    Ok(config.open()?)
}

fn sled_key(user: u64, seq: u64) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&user.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// What raw sled stores per message: level, send time, text.
fn sled_value(sent_at: u64) -> Vec<u8> {
    let mut value = Vec::with_capacity(9 + TEXT.len());
    value.push(20);
    value.extend_from_slice(&sent_at.to_be_bytes());
    value.extend_from_slice(TEXT.as_bytes());
    value
}

/// Raw sled's drain: scan the user's prefix, remove what was read.
fn sled_drain(tree: &sled::Tree, user: u64) -> Res<Vec<sled::IVec>> {
    let mut out = Vec::new();
    for item in tree.scan_prefix(user.to_be_bytes()) {
        let (key, value) = item?;
        tree.remove(&key)?;
        out.push(value);
    }
    Ok(out)
}

fn sqlite_open(dir: &Path, synchronous: &str) -> Res<Connection> {
    let conn = Connection::open(dir.join("messages.db"))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.busy_timeout(Duration::from_secs(60))?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS messages (
             id INTEGER PRIMARY KEY,
             user INTEGER NOT NULL,
             level INTEGER NOT NULL,
             sent_at INTEGER NOT NULL,
             text TEXT NOT NULL);
         CREATE INDEX IF NOT EXISTS messages_user ON messages (user, id);",
    )?;
    Ok(conn)
}

const SQLITE_INSERT: &str =
    "INSERT INTO messages (user, level, sent_at, text) VALUES (?1, 20, ?2, ?3)";

/// SQLite's drain: SELECT + DELETE in one (immediate) transaction.
fn sqlite_drain(conn: &mut Connection, user: u64) -> Res<Vec<(i64, i64, String)>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let rows = {
        let mut select = tx.prepare_cached(
            "SELECT level, sent_at, text FROM messages WHERE user = ?1 ORDER BY id",
        )?;
        select
            .query_map([user as i64], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?
            .collect::<Result<Vec<_>, _>>()?
    };
    if !rows.is_empty() {
        tx.prepare_cached("DELETE FROM messages WHERE user = ?1")?
            .execute([user as i64])?;
    }
    tx.commit()?;
    Ok(rows)
}

fn sqlite_insert_all(conn: &mut Connection, users: impl Iterator<Item = u64>) -> Res<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(SQLITE_INSERT)?;
        let sent_at = now_ms() as i64;
        for user in users {
            insert.execute(params![user as i64, sent_at, TEXT])?;
        }
    }
    tx.commit()?;
    Ok(())
}

fn checkpoint(conn: &Connection) -> Res<()> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

fn sqlite_bytes(dir: &Path) -> Res<f64> {
    du(dir)
}

fn child(workload: &str, imp: &str, n: u64) -> Res<Report> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mut report = Report::new();
    match workload {
        "bulk" => bulk(dir, imp, n, &mut report)?,
        "empty" => empty(dir, imp, n, &mut report)?,
        "drain" => drain(dir, imp, n, &mut report)?,
        "durable" => durable(dir, imp, n, &mut report)?,
        "single" => single(dir, imp, n, &mut report)?,
        "disk" => disk(dir, imp, n, &mut report)?,
        _ => return Err(format!("unknown workload {workload}").into()),
    }
    report.insert("hwm_kb".into(), status_kb("VmHWM"));
    Ok(report)
}

fn idle(report: &mut Report) {
    report.insert("idle_kb".into(), status_kb("VmRSS"));
}

fn timed(report: &mut Report, n: u64, work: impl FnOnce() -> Res<()>) -> Res<()> {
    let started = Instant::now();
    work()?;
    let secs = started.elapsed().as_secs_f64();
    report.insert("secs".into(), secs);
    report.insert("rate".into(), n as f64 / secs);
    Ok(())
}

/// One message to `n` users; the send is durable when it returns.
fn bulk(dir: &Path, imp: &str, n: u64, report: &mut Report) -> Res<()> {
    match imp {
        "ours" => {
            let store = ours(dir, Durability::Immediate)?;
            idle(report);
            timed(report, n, || {
                let sent = store.message_users(0..n, TEXT, Level::Info)?;
                assert_eq!(sent.recipients(), n);
                Ok(())
            })?;
        }
        "sled-inserts" | "sled-batches" => {
            let db = sled_open(dir)?;
            let tree = db.open_tree("messages")?;
            idle(report);
            timed(report, n, || {
                let seq = db.generate_id()?;
                let value = sled_value(now_ms());
                if imp == "sled-inserts" {
                    for user in 0..n {
                        tree.insert(sled_key(user, seq), value.as_slice())?;
                    }
                } else {
                    let mut batch = sled::Batch::default();
                    for user in 0..n {
                        batch.insert(&sled_key(user, seq), value.as_slice());
                        if (user + 1) % 8192 == 0 {
                            tree.apply_batch(std::mem::take(&mut batch))?;
                        }
                    }
                    tree.apply_batch(batch)?;
                }
                db.flush()?;
                Ok(())
            })?;
        }
        "sqlite" => {
            let mut conn = sqlite_open(dir, "NORMAL")?;
            idle(report);
            timed(report, n, || sqlite_insert_all(&mut conn, 0..n))?;
        }
        _ => return Err(format!("unknown impl {imp}").into()),
    }
    Ok(())
}

/// `n` timed drains of users who have nothing queued, while other users do.
fn empty(dir: &Path, imp: &str, n: u64, report: &mut Report) -> Res<()> {
    let background = n.min(100_000);
    let mut ns = Vec::with_capacity(n as usize);
    match imp {
        "ours" => {
            let store = ours(dir, periodic())?;
            store.message_users(0..background, TEXT, Level::Info)?;
            for user in NEVER..NEVER + n {
                let t = Instant::now();
                let got = store.get_messages(user)?;
                ns.push(t.elapsed().as_nanos() as u64);
                assert!(got.is_empty());
            }
        }
        "sled" => {
            let db = sled_open(dir)?;
            let tree = db.open_tree("messages")?;
            let value = sled_value(now_ms());
            for user in 0..background {
                tree.insert(sled_key(user, 0), value.as_slice())?;
            }
            for user in NEVER..NEVER + n {
                let t = Instant::now();
                let got = sled_drain(&tree, user)?;
                ns.push(t.elapsed().as_nanos() as u64);
                assert!(got.is_empty());
            }
        }
        "sqlite" => {
            let mut conn = sqlite_open(dir, "NORMAL")?;
            sqlite_insert_all(&mut conn, 0..background)?;
            for user in NEVER..NEVER + n {
                let t = Instant::now();
                let got = sqlite_drain(&mut conn, user)?;
                ns.push(t.elapsed().as_nanos() as u64);
                assert!(got.is_empty());
            }
        }
        _ => return Err(format!("unknown impl {imp}").into()),
    }
    percentiles(report, ns);
    Ok(())
}

/// `n` users with 1, 2 or 3 messages each (sent one by one), then each
/// user's queue drained once, in scattered order, each drain timed.
fn drain(dir: &Path, imp: &str, n: u64, report: &mut Report) -> Res<()> {
    let per_user = |user: u64| 1 + user % 3;
    // Durable drains fsync each: fewer samples.
    let n = if imp == "ours-durable" {
        n.min(2_000)
    } else {
        n
    };
    let mut ns = Vec::with_capacity(n as usize);
    match imp {
        "ours" | "ours-durable" => {
            let store = ours(
                dir,
                if imp == "ours" {
                    periodic()
                } else {
                    Durability::Immediate
                },
            )?;
            for round in 0..3 {
                let users = (0..n).filter(|&u| per_user(u) > round);
                if imp == "ours" {
                    for user in users {
                        store.message_user(user, TEXT, Level::Info)?;
                    }
                } else {
                    // With `Immediate` a send costs an fsync: fill by one
                    // bulk send per round instead.
                    store.message_users(users, TEXT, Level::Info)?;
                }
            }
            for user in scattered(n) {
                let t = Instant::now();
                let got = store.get_messages(user)?;
                ns.push(t.elapsed().as_nanos() as u64);
                assert_eq!(got.len() as u64, per_user(user));
            }
        }
        "sled" => {
            let db = sled_open(dir)?;
            let tree = db.open_tree("messages")?;
            for round in 0..3 {
                let value = sled_value(now_ms());
                for user in (0..n).filter(|&u| per_user(u) > round) {
                    tree.insert(sled_key(user, db.generate_id()?), value.as_slice())?;
                }
            }
            for user in scattered(n) {
                let t = Instant::now();
                let got = sled_drain(&tree, user)?;
                ns.push(t.elapsed().as_nanos() as u64);
                assert_eq!(got.len() as u64, per_user(user));
            }
        }
        "sqlite" => {
            let mut conn = sqlite_open(dir, "NORMAL")?;
            for round in 0..3 {
                sqlite_insert_all(&mut conn, (0..n).filter(|&u| per_user(u) > round))?;
            }
            for user in scattered(n) {
                let t = Instant::now();
                let got = sqlite_drain(&mut conn, user)?;
                ns.push(t.elapsed().as_nanos() as u64);
                assert_eq!(got.len() as u64, per_user(user));
            }
        }
        _ => return Err(format!("unknown impl {imp}").into()),
    }
    percentiles(report, ns);
    Ok(())
}

/// Sends that are on disk when they return, from 1 or 8 threads, for `ms`
/// milliseconds; reports sends per second.
fn durable(dir: &Path, imp: &str, ms: u64, report: &mut Report) -> Res<()> {
    let (name, threads) = imp.split_once('-').ok_or("impl-threads")?;
    let threads: u64 = threads.parse()?;
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_millis(ms);
    let started = Instant::now();
    match name {
        "ours" => {
            let store = ours(dir, Durability::Immediate)?;
            std::thread::scope(|s| -> Res<()> {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        let (store, done) = (store.clone(), done.clone());
                        s.spawn(move || -> Result<(), async_messages::Error> {
                            let mut i = 0;
                            while Instant::now() < deadline {
                                store.message_user(t << 32 | i, TEXT, Level::Info)?;
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
        }
        "sled" | "sledsync" => {
            let db = sled_open(dir)?;
            let tree = db.open_tree("messages")?;
            // sled 0.34's flush ends in sync_file_range(2), which neither
            // flushes the drive's write cache nor file metadata; "sledsync"
            // adds an fdatasync(2) of sled's data file (what SQLite FULL does).
            let file = std::fs::File::open(dir.join("sled").join("db"))?;
            let file = &file;
            let sync = name == "sledsync";
            std::thread::scope(|s| -> Res<()> {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        let (db, tree, done) = (db.clone(), tree.clone(), done.clone());
                        s.spawn(move || -> sled::Result<()> {
                            let mut i = 0;
                            while Instant::now() < deadline {
                                let key = sled_key(t << 32 | i, db.generate_id()?);
                                tree.insert(key, sled_value(now_ms()))?;
                                db.flush()?;
                                if sync {
                                    file.sync_data()?;
                                }
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
        }
        "sqlite" => {
            drop(sqlite_open(dir, "FULL")?);
            std::thread::scope(|s| -> Res<()> {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        let done = done.clone();
                        s.spawn(move || -> Result<(), String> {
                            let conn = sqlite_open(dir, "FULL").map_err(|e| e.to_string())?;
                            let mut insert = conn
                                .prepare_cached(SQLITE_INSERT)
                                .map_err(|e| e.to_string())?;
                            let mut i = 0_u64;
                            while Instant::now() < deadline {
                                insert
                                    .execute(params![(t << 32 | i) as i64, now_ms() as i64, TEXT])
                                    .map_err(|e| e.to_string())?;
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
        }
        _ => return Err(format!("unknown impl {imp}").into()),
    }
    let secs = started.elapsed().as_secs_f64();
    report.insert("sends".into(), done.load(Ordering::Relaxed) as f64);
    report.insert("rate".into(), done.load(Ordering::Relaxed) as f64 / secs);
    Ok(())
}

/// `n` single sends from one thread to `n` users, not flushed each.
fn single(dir: &Path, imp: &str, n: u64, report: &mut Report) -> Res<()> {
    match imp {
        "ours" => {
            let store = ours(dir, periodic())?;
            timed(report, n, || {
                for user in 0..n {
                    store.message_user(user, TEXT, Level::Info)?;
                }
                Ok(())
            })?;
        }
        "sled" => {
            let db = sled_open(dir)?;
            let tree = db.open_tree("messages")?;
            timed(report, n, || {
                for user in 0..n {
                    tree.insert(sled_key(user, db.generate_id()?), sled_value(now_ms()))?;
                }
                Ok(())
            })?;
        }
        "sqlite" => {
            let conn = sqlite_open(dir, "NORMAL")?;
            let mut insert = conn.prepare_cached(SQLITE_INSERT)?;
            timed(report, n, || {
                for user in 0..n {
                    insert.execute(params![user as i64, now_ms() as i64, TEXT])?;
                }
                Ok(())
            })?;
        }
        _ => return Err(format!("unknown impl {imp}").into()),
    }
    Ok(())
}

/// Disk use after `n` messages (one per user), after draining every user,
/// and after closing and reopening.
fn disk(dir: &Path, imp: &str, n: u64, report: &mut Report) -> Res<()> {
    match imp {
        "ours" | "ours-each" => {
            let path = dir.join("store");
            {
                let store = ours(dir, periodic())?;
                if imp == "ours" {
                    store.message_users(0..n, TEXT, Level::Info)?;
                } else {
                    for user in 0..n {
                        store.message_user(user, TEXT, Level::Info)?;
                    }
                }
                store.flush()?;
                report.insert("full_bytes".into(), du(&path)?);
                report.insert("size_on_disk_full".into(), store.size_on_disk()? as f64);
                for user in 0..n {
                    assert_eq!(store.get_messages(user)?.len(), 1);
                }
                store.flush()?;
                report.insert("drained_bytes".into(), du(&path)?);
                report.insert("size_on_disk_drained".into(), store.size_on_disk()? as f64);
            }
            let store = ours(dir, periodic())?;
            store.flush()?;
            report.insert("reopened_bytes".into(), du(&path)?);
        }
        "sled" => {
            let path = dir.join("sled");
            {
                let db = sled_open(dir)?;
                let tree = db.open_tree("messages")?;
                let value = sled_value(now_ms());
                let seq = db.generate_id()?;
                for user in 0..n {
                    tree.insert(sled_key(user, seq), value.as_slice())?;
                }
                db.flush()?;
                report.insert("full_bytes".into(), du(&path)?);
                for user in 0..n {
                    assert_eq!(sled_drain(&tree, user)?.len(), 1);
                }
                db.flush()?;
                report.insert("drained_bytes".into(), du(&path)?);
            }
            // sled's threads may hold the lock for a moment after the drop.
            let db = loop {
                match sled_open(dir) {
                    Ok(db) => break db,
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            };
            db.flush()?;
            report.insert("reopened_bytes".into(), du(&path)?);
        }
        "sqlite" => {
            {
                let mut conn = sqlite_open(dir, "NORMAL")?;
                sqlite_insert_all(&mut conn, 0..n)?;
                checkpoint(&conn)?;
                report.insert("full_bytes".into(), sqlite_bytes(dir)?);
                for user in 0..n {
                    assert_eq!(sqlite_drain(&mut conn, user)?.len(), 1);
                }
                checkpoint(&conn)?;
                report.insert("drained_bytes".into(), sqlite_bytes(dir)?);
            }
            let conn = sqlite_open(dir, "NORMAL")?;
            checkpoint(&conn)?;
            report.insert("reopened_bytes".into(), sqlite_bytes(dir)?);
        }
        _ => return Err(format!("unknown impl {imp}").into()),
    }
    Ok(())
}
