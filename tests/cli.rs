//! The `async-messages` command-line tool, run as a separate process: sends
//! while the app holds the store, concurrent senders, export/import, bad
//! input, the read commands, and a store held by another process.
#![cfg(feature = "cli")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use async_messages::{Level, Message, MessageStore, Result, UserId};
use common::{TestDir, raw_db, texts};
use predicates::prelude::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_async-messages");

/// The tool, with the backtrace variables cleared (an error must be a
/// sentence whatever the environment).
fn cli() -> Command {
    let mut command = Command::new(BIN);
    command
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .timeout(Duration::from_secs(60));
    command
}

/// The path as an argument.
fn arg(path: &std::path::Path) -> &str {
    path.to_str().expect("UTF-8 temporary path")
}

/// Standard error is one line, a sentence: `error: …`, no panic, no trace.
fn one_sentence() -> impl Predicate<str> {
    predicate::str::starts_with("error: ")
        .and(predicate::function(|err: &str| {
            err.trim_end().lines().count() == 1
        }))
        .and(predicate::str::contains("panicked").not())
        .and(predicate::str::contains("backtrace").not())
}

/// Drains `user` until `n` messages came or `deadline` passed.
fn drain_until(store: &MessageStore, user: u64, n: usize, deadline: Duration) -> Vec<Message> {
    let started = Instant::now();
    let mut got = Vec::new();
    while got.len() < n && started.elapsed() < deadline {
        got.extend(store.get_messages(user).expect("drain"));
        std::thread::sleep(Duration::from_millis(5));
    }
    got
}

/// Every user's queue as (level, text) lists.
fn contents(store: &MessageStore) -> Result<BTreeMap<UserId, Vec<(Level, String)>>> {
    let mut all = BTreeMap::new();
    for user in store.users()? {
        let queue: Vec<_> = store
            .peek(&user)?
            .iter()
            .map(|m| (m.level(), m.text().to_owned()))
            .collect();
        if !queue.is_empty() {
            all.insert(user, queue);
        }
    }
    Ok(all)
}

/// The key the store uses for integer user `user`, message `seq`.
fn int_key(user: u64, seq: u64) -> Vec<u8> {
    let mut key = vec![0x01];
    key.extend_from_slice(&user.to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Files in the store's spool (waiting, being written, or rejected).
fn spool_files(dir: &TestDir) -> usize {
    ["new", "tmp", "rejected"]
        .iter()
        .filter_map(|sub| std::fs::read_dir(dir.store_path().join("spool").join(sub)).ok())
        .map(Iterator::count)
        .sum()
}

/// A closed store with three messages for user 42, one for "alice".
fn small_store(dir: &TestDir) -> Result<()> {
    let store = dir.open()?;
    store.info(42_u64, "first")?;
    store.warning(42_u64, "second\nhas two lines")?;
    store.error(42_u64, "third")?;
    store.success("alice", "for alice")?;
    Ok(())
}

// (a) A send while the app runs.

#[test]
fn a_send_while_the_app_holds_the_store_reaches_its_next_drain() -> Result<()> {
    let dir = TestDir::new();
    let app = dir.open()?;
    cli()
        .args(["send", arg(&dir.store_path()), "42", "Your export is ready"])
        .args(["--level", "success"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "Queued a success message for user 42",
        ));
    let got = drain_until(&app, 42, 1, Duration::from_secs(10));
    assert_eq!(texts(&got), ["Your export is ready"]);
    assert_eq!(got[0].level(), Level::Success);
    std::thread::sleep(Duration::from_millis(200));
    assert!(app.get_messages(42_u64)?.is_empty(), "delivered twice");
    Ok(())
}

#[test]
fn a_send_while_no_app_runs_is_there_at_the_next_open() -> Result<()> {
    let dir = TestDir::new();
    cli()
        .args(["send", arg(&dir.store_path()), "alice", "Welcome back"])
        .assert()
        .success();
    cli()
        .args(["send", arg(&dir.store_path()), "7", "as a string"])
        .arg("--string-id")
        .assert()
        .success();
    let store = dir.open()?;
    let got = store.get_messages("alice")?;
    assert_eq!(texts(&got), ["Welcome back"]);
    assert_eq!(got[0].level(), Level::Info);
    assert_eq!(texts(&store.get_messages("7")?), ["as a string"]);
    assert!(store.get_messages(7_u64)?.is_empty());
    Ok(())
}

#[test]
fn a_read_command_takes_in_the_spool_and_keeps_debug_messages() {
    let dir = TestDir::new();
    let store = arg(&dir.store_path()).to_owned();
    cli()
        .args(["send", &store, "42", "details", "--level", "debug"])
        .assert()
        .success()
        .stderr(predicate::str::contains("minimum level is debug"));
    cli()
        .args(["count", &store, "42"])
        .assert()
        .success()
        .stdout("1\n");
    cli()
        .args(["peek", &store, "42", "--json"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            r#""level":"debug","text":"details""#,
        ));
}

// (b) Concurrent senders.

#[test]
fn four_processes_sending_25_each_deliver_every_message_once_in_order() -> Result<()> {
    const SENDERS: usize = 4;
    const EACH: usize = 25;
    let dir = TestDir::new();
    let app = dir.open()?;
    let path = dir.store_path();
    let senders: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let path = path.clone();
            std::thread::spawn(move || {
                for n in 0..EACH {
                    let status = std::process::Command::new(BIN)
                        .args(["send", arg(&path), "7", &format!("{sender}:{n:02}")])
                        .stdout(Stdio::null())
                        .status()
                        .expect("run the tool");
                    assert!(status.success(), "sender {sender}, send {n}: {status}");
                }
            })
        })
        .collect();
    // The app drains while the senders run.
    let mut got = Vec::new();
    while senders.iter().any(|s| !s.is_finished()) {
        got.extend(app.get_messages(7_u64)?);
        std::thread::sleep(Duration::from_millis(5));
    }
    for sender in senders {
        sender.join().expect("a sender thread panicked");
    }
    let missing = SENDERS * EACH - got.len();
    got.extend(drain_until(&app, 7, missing, Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(200));
    got.extend(app.get_messages(7_u64)?);

    let all = texts(&got);
    let distinct: BTreeSet<&String> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "a message was delivered twice");
    assert_eq!(all.len(), SENDERS * EACH, "messages were lost");
    for sender in 0..SENDERS {
        let mine: Vec<&String> = all
            .iter()
            .filter(|t| t.starts_with(&format!("{sender}:")))
            .collect();
        let mut sorted = mine.clone();
        sorted.sort();
        assert_eq!(mine, sorted, "sender {sender}'s messages out of order");
    }
    Ok(())
}

// (c) Export, then import into a new store.

#[test]
fn export_then_import_gives_the_same_messages_levels_and_order() -> Result<()> {
    let source = TestDir::new();
    let bulk_users: Vec<UserId> = (1000..1298_u64)
        .map(UserId::Int)
        .chain([UserId::Int(1), UserId::from("alice")])
        .collect();
    {
        let store = MessageStore::builder()
            .path(source.store_path())
            .min_level(Level::Debug)
            .open()?;
        store.info(1_u64, "one a")?;
        store.warning(1_u64, "one b")?;
        store.debug(2_u64, "two, debug")?;
        store.success("alice", "alice a")?;
        store.info("42", "the string id 42")?;
        store.message_users(&bulk_users, "to 300 users", Level::Warning)?;
        store.message_users(
            [UserId::Int(2), UserId::from("alice"), UserId::Int(5)],
            "to three users",
            Level::Success,
        )?;
        store.error(1_u64, "one c, after the bulk send")?;
        store.info(u64::MAX, "the largest integer id")?;
        assert_eq!(store.stats()?.bulk_records, 1);
    }
    let export = cli()
        .args(["export", arg(&source.store_path())])
        .assert()
        .success()
        .stderr(predicate::str::contains(
            "Exported 310 messages of 304 users",
        ))
        .get_output()
        .stdout
        .clone();

    // One line per (user, message), in (user, send order) order; the
    // lines of one send share its id.
    let lines: Vec<Value> = String::from_utf8_lossy(&export)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 310);
    for line in &lines {
        let keys: BTreeSet<&str> = line
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from([
                "id",
                "user",
                "level",
                "text",
                "sent_at_ms",
                "expires_at_ms",
                "replace_key"
            ])
        );
        assert!(line["expires_at_ms"].is_null() && line["replace_key"].is_null());
    }
    assert_eq!(lines[0]["user"], 1);
    assert_eq!(lines[0]["text"], "one a");
    assert!(
        lines.iter().any(|l| l["user"] == "42"),
        "string id as a string"
    );
    assert!(lines.iter().any(|l| l["user"] == u64::MAX));
    let bulk_ids: BTreeSet<u64> = lines
        .iter()
        .filter(|l| l["text"] == "to 300 users")
        .map(|l| l["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(bulk_ids.len(), 1);

    // Export never consumes.
    let again = cli()
        .args(["export", arg(&source.store_path())])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    assert_eq!(again, export);

    let target = TestDir::new();
    cli()
        .args(["import", arg(&target.store_path())])
        .write_stdin(export)
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "Imported 310 messages (9 sends, from 310 lines) for 304 users",
        ));

    let source = MessageStore::open(source.store_path())?;
    let target = MessageStore::open(target.store_path())?;
    let expected = contents(&source)?;
    assert_eq!(contents(&target)?, expected);
    assert_eq!(
        expected[&UserId::Int(1)],
        [
            (Level::Info, "one a".to_owned()),
            (Level::Warning, "one b".to_owned()),
            (Level::Warning, "to 300 users".to_owned()),
            (Level::Error, "one c, after the bulk send".to_owned()),
        ]
    );
    assert_eq!(
        expected[&UserId::Int(2)][0],
        (Level::Debug, "two, debug".to_owned())
    );
    // Stored once again: one bulk record, and every copy shares one id.
    assert_eq!(target.stats()?.bulk_records, 1);
    let ids: BTreeSet<_> = bulk_users
        .iter()
        .flat_map(|user| target.peek(user).expect("peek"))
        .filter(|m| m.text() == "to 300 users")
        .map(|m| m.id())
        .collect();
    assert_eq!(ids.len(), 1);
    let few: BTreeSet<_> = [UserId::Int(2), UserId::from("alice"), UserId::Int(5)]
        .iter()
        .flat_map(|user| target.peek(user).expect("peek"))
        .filter(|m| m.text() == "to three users")
        .map(|m| m.id())
        .collect();
    assert_eq!(few.len(), 1);
    Ok(())
}

#[test]
fn a_bad_import_line_stores_nothing() -> Result<()> {
    let dir = TestDir::new();
    let good = r#"{"id":1,"user":1,"level":"info","text":"fine","sent_at_ms":0}"#;
    for (bad, expected) in [
        (r#"{"id":2,"user":1,"level":"loud","text":"x"}"#, "line 2"),
        (
            r#"{"id":2,"user":1,"level":"info","text":""}"#,
            "empty text",
        ),
        (
            r#"{"id":2,"user":1,"level":"info","text":"x","expires_at_ms":"soon"}"#,
            "\"expires_at_ms\"",
        ),
        (
            r#"{"id":2,"user":1,"level":"info","text":"x","expires_at_ms":99999999999999999}"#,
            "3650 days",
        ),
        (
            r#"{"id":2,"user":1,"level":"info","text":"x","replace_key":""}"#,
            "empty \"replace_key\"",
        ),
        (
            r#"{"id":2,"user":1,"level":"info","text":"x","urgent":true}"#,
            "\"urgent\"",
        ),
        ("not json", "not valid JSON"),
    ] {
        cli()
            .args(["import", arg(&dir.store_path())])
            .write_stdin(format!("{good}\n{bad}\n"))
            .assert()
            .code(1)
            .stderr(one_sentence().and(predicate::str::contains(expected)));
        assert!(!dir.store_path().exists(), "{bad}: the store was created");
    }
    Ok(())
}

// (d) Bad input.

#[test]
fn bad_sends_exit_1_with_a_sentence_and_store_nothing() -> Result<()> {
    let dir = TestDir::new();
    dir.open()?.info(9_u64, "already there")?;
    let store = arg(&dir.store_path()).to_owned();
    let oversize = "x".repeat(64 * 1024 + 1);
    let long_user = "u".repeat(1025);
    let long_key = "k".repeat(257);
    for (args, expected) in [
        (vec!["send", &store, "42", ""], "empty"),
        (vec!["send", &store, "42", &oversize], "65537 bytes"),
        (
            vec!["send", &store, "42", "hi", "--level", "loud"],
            "not a message level",
        ),
        (
            vec!["send", &store, "42", "hi", "--expires-after", "soon"],
            "is not a duration",
        ),
        (
            vec!["send", &store, "42", "hi", "--expires-after", "0s"],
            "would never be shown",
        ),
        (
            vec!["send", &store, "42", "hi", "--expires-after", "20000days"],
            "longer than any message should wait",
        ),
        (
            vec!["send", &store, "42", "hi", "--replace-key", ""],
            "replace key is empty",
        ),
        (
            vec!["send", &store, "42", "hi", "--replace-key", &long_key],
            "257 bytes",
        ),
        (
            vec!["send", &store, "--everyone", "hi", "--replace-key", ""],
            "replace key is empty",
        ),
        (
            vec![
                "send",
                &store,
                "--everyone",
                "hi",
                "--expires-after",
                "1 fortnight",
            ],
            "is not a duration",
        ),
        (vec!["send", &store, &long_user, "hi"], "1025 bytes"),
        (
            vec!["send", &store, "99999999999999999999", "hi"],
            "--string-id",
        ),
    ] {
        cli()
            .args(&args)
            .assert()
            .code(1)
            .stdout("")
            .stderr(one_sentence().and(predicate::str::contains(expected)));
    }
    assert_eq!(spool_files(&dir), 0, "a bad send left a spool file");
    // Opening takes in anything spooled: there is nothing.
    let store = dir.open()?;
    assert_eq!(store.users()?, [UserId::Int(9)]);
    assert_eq!(texts(&store.peek(9_u64)?), ["already there"]);
    Ok(())
}

#[test]
fn bad_sends_to_a_new_path_leave_nothing_behind() {
    let dir = TestDir::new();
    let store = arg(&dir.store_path()).to_owned();
    for args in [
        vec!["send", &store, "42", ""],
        vec!["send", &store, "42", "hi", "--level", "7"],
        vec!["send", &store, "42", "hi", "--expires-after", "10 parsecs"],
        vec!["send", &store, "42", "hi", "--expires-after", "0ms"],
        vec!["send", &store, "42", "hi", "--replace-key", ""],
        vec!["send", &store, "--everyone", "hi", "--expires-after=-1h"],
    ] {
        cli().args(&args).assert().code(1).stderr(one_sentence());
        assert!(!dir.store_path().exists(), "{args:?} created the store");
    }
}

#[test]
fn a_send_by_another_user_than_the_stores_owner_is_refused() -> Result<()> {
    let dir = TestDir::new();
    dir.open()?.info(9_u64, "already there")?;
    // Only root can give the store away; as another user, there is nothing
    // to show (the spool's 0700 directory already refuses other users).
    let spool = dir.store_path().join("spool");
    if std::os::unix::fs::chown(&spool, Some(54_321), None).is_err() {
        return Ok(());
    }
    cli()
        .args(["send", arg(&dir.store_path()), "42", "hi"])
        .assert()
        .code(1)
        .stderr(one_sentence().and(predicate::str::contains("belongs to user 54321")));
    assert_eq!(spool_files(&dir), 0);
    Ok(())
}

#[test]
fn a_store_path_that_is_a_file_is_refused_and_kept() -> Result<()> {
    let dir = TestDir::new();
    let file = dir.store_path();
    std::fs::write(&file, "not a store").expect("write the file");
    for args in [
        vec!["send", arg(&file), "42", "hi"],
        vec!["peek", arg(&file), "42"],
        vec!["stats", arg(&file)],
        vec!["import", arg(&file)],
    ] {
        cli()
            .args(&args)
            .write_stdin(r#"{"id":1,"user":1,"level":"info","text":"x"}"#)
            .assert()
            .code(1)
            .stderr(one_sentence().and(predicate::str::contains("is not a directory")));
    }
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "not a store");
    Ok(())
}

#[test]
fn read_commands_never_create_a_store() {
    let dir = TestDir::new();
    let missing = arg(&dir.store_path()).to_owned();
    for args in [
        vec!["peek", &missing, "42"],
        vec!["count", &missing, "42"],
        vec!["stats", &missing],
        vec!["export", &missing],
        vec!["purge", &missing, "42"],
        vec!["check", &missing],
    ] {
        cli()
            .args(&args)
            .assert()
            .code(1)
            .stderr(one_sentence().and(predicate::str::contains("no message store")));
        assert!(!dir.store_path().exists(), "{args:?} created the store");
    }
    // A directory holding something else is not taken for a store either.
    let other = TestDir::new();
    std::fs::write(other.store_path(), "x").expect("write");
    let parent = other.store_path().parent().expect("parent").to_owned();
    for args in [
        vec!["peek", arg(&parent), "42"],
        vec!["send", arg(&parent), "42", "hi"],
    ] {
        cli()
            .args(&args)
            .assert()
            .code(1)
            .stderr(one_sentence().and(predicate::str::contains("not a message store")));
    }
    assert_eq!(
        std::fs::read_dir(&parent).expect("list").count(),
        1,
        "files were added to a directory that is not a store"
    );
}

#[test]
fn usage_errors_exit_2() {
    let dir = TestDir::new();
    let store = arg(&dir.store_path()).to_owned();
    for args in [
        vec![],
        vec!["send", &store, "42"],
        // USER, or --everyone: not both, not neither.
        vec!["send", &store, "42", "hi", "--everyone"],
        vec!["send", &store, "--everyone"],
        vec!["send", &store, "--everyone", "hi", "--string-id"],
        vec!["peek", &store],
        vec!["frobnicate", &store],
        vec!["stats", &store, "--jsn"],
        vec!["peek", &store, "42", "--namespace", "ns"],
    ] {
        cli().args(&args).assert().code(2);
    }
    assert!(!dir.store_path().exists());
}

#[cfg(not(feature = "redis"))]
#[test]
fn a_redis_url_without_the_redis_feature_says_so() {
    cli()
        .args(["send", "redis://127.0.0.1:1/0", "42", "hi"])
        .assert()
        .code(1)
        .stderr(one_sentence().and(predicate::str::contains("no Redis support")));
}

// (e) The read commands.

#[test]
fn peek_never_consumes_and_count_agrees() -> Result<()> {
    let dir = TestDir::new();
    small_store(&dir)?;
    let store = arg(&dir.store_path()).to_owned();
    let first = cli().args(["peek", &store, "42"]).assert().success();
    let first = first.get_output().stdout.clone();
    let text = String::from_utf8_lossy(&first);
    assert!(
        text.starts_with("3 messages queued for user 42, oldest first:"),
        "{text}"
    );
    assert!(text.contains("    second\n    has two lines\n"), "{text}");
    cli()
        .args(["peek", &store, "42"])
        .assert()
        .success()
        .stdout(text.into_owned());

    let json = cli()
        .args(["peek", &store, "42", "--json"])
        .assert()
        .success();
    let json: Value = serde_json::from_slice(&json.get_output().stdout).expect("JSON");
    assert_eq!(json["user"], 42);
    let messages = json["messages"].as_array().expect("messages");
    let levels: Vec<&str> = messages
        .iter()
        .map(|m| m["level"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(levels, ["info", "warning", "error"]);
    for message in messages {
        let keys: BTreeSet<&str> = message
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from([
                "id",
                "level",
                "text",
                "sent_at_ms",
                "expires_at_ms",
                "replace_key"
            ])
        );
    }
    let alice = cli()
        .args(["peek", &store, "alice", "--json"])
        .assert()
        .success();
    let alice: Value = serde_json::from_slice(&alice.get_output().stdout).expect("JSON");
    assert_eq!(alice["user"], "alice");

    cli()
        .args(["count", &store, "42"])
        .assert()
        .success()
        .stdout("3\n");
    cli()
        .args(["count", &store, "alice"])
        .assert()
        .success()
        .stdout("1\n");
    cli()
        .args(["count", &store, "42", "--string-id"])
        .assert()
        .success()
        .stdout("0\n");
    cli()
        .args(["peek", &store, "nobody"])
        .assert()
        .success()
        .stdout("No messages queued for user \"nobody\".\n");

    let store = dir.open()?;
    assert_eq!(
        texts(&store.get_messages(42_u64)?),
        ["first", "second\nhas two lines", "third"]
    );
    Ok(())
}

#[test]
fn stats_json_has_the_documented_fields() -> Result<()> {
    let dir = TestDir::new();
    small_store(&dir)?;
    dir.open()?
        .message_users(1000..1300_u64, "to 300 users", Level::Info)?;
    let out = cli()
        .args(["stats", arg(&dir.store_path()), "--json"])
        .assert()
        .success();
    let stats: Value = serde_json::from_slice(&out.get_output().stdout).expect("JSON");
    let keys: BTreeSet<&str> = stats
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "users",
            "messages",
            "bulk_records",
            "size_on_disk",
            "quarantined"
        ])
    );
    assert_eq!(stats["users"], 302);
    assert_eq!(stats["messages"], 304);
    assert_eq!(stats["bulk_records"], 1);
    assert_eq!(stats["quarantined"], 0);
    assert!(stats["size_on_disk"].as_u64().is_some_and(|n| n > 0));
    cli()
        .args(["stats", arg(&dir.store_path())])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("Users with messages:  302")
                .and(predicate::str::contains("Messages:             304"))
                .and(predicate::str::contains("Bulk records:         1")),
        );
    Ok(())
}

#[test]
fn purge_removes_one_users_messages_and_says_how_many() -> Result<()> {
    let dir = TestDir::new();
    small_store(&dir)?;
    let store = arg(&dir.store_path()).to_owned();
    cli()
        .args(["purge", &store, "42"])
        .assert()
        .success()
        .stdout("Removed 3 messages queued for user 42.\n");
    cli()
        .args(["purge", &store, "42"])
        .assert()
        .success()
        .stdout("Removed 0 messages queued for user 42.\n");
    let store = dir.open()?;
    assert!(store.peek(42_u64)?.is_empty());
    assert_eq!(texts(&store.peek("alice")?), ["for alice"]);
    Ok(())
}

#[test]
fn check_reports_a_healthy_store() -> Result<()> {
    let dir = TestDir::new();
    small_store(&dir)?;
    cli()
        .args(["check", arg(&dir.store_path())])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("2 users with 4 messages")
                .and(predicate::str::contains("No damage found"))
                .and(predicate::str::contains(
                    "Quarantined before this check: none.",
                )),
        );
    let out = cli()
        .args(["check", arg(&dir.store_path()), "--json"])
        .assert()
        .success();
    let report: Value = serde_json::from_slice(&out.get_output().stdout).expect("JSON");
    assert_eq!(report["users"], 2);
    assert_eq!(report["messages"], 4);
    assert_eq!(report["quarantined_now"], Value::Array(vec![]));
    assert_eq!(report["quarantined_before"], Value::Array(vec![]));
    Ok(())
}

#[test]
fn check_finds_a_damaged_record_quarantines_it_and_keeps_the_rest() -> Result<()> {
    let dir = TestDir::new();
    {
        let store = dir.open()?;
        store.info(1_u64, "one, first")?;
        store.info(1_u64, "one, second")?;
        store.info(3_u64, "three")?;
    }
    {
        let db = raw_db(&dir.store_path());
        let messages = db.open_tree("messages").expect("messages tree");
        messages
            .insert(int_key(1, u64::MAX / 2), &[1_u8, 0xff, 0xfe, 0x00][..])
            .expect("insert");
        db.flush().expect("flush");
    }
    cli()
        .args(["check", arg(&dir.store_path())])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("Damage found: 1 record could not be read")
                .and(predicate::str::contains("  messages 01"))
                .and(predicate::str::contains("2 users with 3 messages")),
        );
    // A second check finds it in quarantine, and nothing new.
    let out = cli()
        .args(["check", arg(&dir.store_path()), "--json"])
        .assert()
        .success();
    let report: Value = serde_json::from_slice(&out.get_output().stdout).expect("JSON");
    assert_eq!(report["quarantined_now"], Value::Array(vec![]));
    let before = report["quarantined_before"].as_array().expect("array");
    assert_eq!(before.len(), 1);
    assert_eq!(before[0]["tree"], "messages");
    assert_eq!(
        before[0]["key"],
        format!("01{:016x}{:016x}", 1, u64::MAX / 2)
    );
    assert!(before[0]["reason"].as_str().is_some_and(|r| !r.is_empty()));
    cli()
        .args(["stats", arg(&dir.store_path()), "--json"])
        .assert()
        .success()
        .stdout(predicate::str::contains("\"quarantined\":1"));
    let store = dir.open()?;
    assert_eq!(texts(&store.peek(1_u64)?), ["one, first", "one, second"]);
    Ok(())
}

#[test]
fn export_into_a_closed_pipe_stops_quietly() -> Result<()> {
    let dir = TestDir::new();
    dir.open()?
        .message_users(0..20_000_u64, "to many users", Level::Info)?;
    let mut child = std::process::Command::new(BIN)
        .args(["export", arg(&dir.store_path())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the tool");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read a line");
    assert!(first.contains("to many users"));
    // The reader is gone (dropped above), as with `export | head -1`.
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    // Without its handling, the write would panic (exit code 101).
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err, "", "nothing to say to a reader that left");
    Ok(())
}

// (f) A store held by another handle.

#[test]
fn read_commands_on_a_store_held_by_the_app_say_so_quickly() -> Result<()> {
    let dir = TestDir::new();
    small_store(&dir)?;
    let app = dir.open()?;
    let store = arg(&dir.store_path()).to_owned();
    for args in [
        vec!["peek", &store, "42"],
        vec!["count", &store, "42"],
        vec!["stats", &store],
        vec!["export", &store],
        vec!["check", &store],
        vec!["purge", &store, "42"],
        vec!["import", &store],
    ] {
        let started = Instant::now();
        cli()
            .args(&args)
            .write_stdin(r#"{"id":1,"user":42,"level":"info","text":"imported"}"#)
            .timeout(Duration::from_secs(10))
            .assert()
            .code(1)
            .stdout("")
            .stderr(
                one_sentence()
                    .and(predicate::str::contains("is open in another process"))
                    .and(predicate::str::contains("`async-messages send` works")),
            );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{args:?} took {:?}",
            started.elapsed()
        );
    }
    // Purge and import did nothing.
    assert_eq!(app.count(42_u64)?, 3);
    Ok(())
}

// Redis (feature `redis`): the same commands against a real server.

#[cfg(feature = "redis")]
#[test]
fn on_redis_send_peek_stats_and_export_import_across_namespaces() -> Result<()> {
    let Some(server) = common::redis::RedisServer::start_or_skip() else {
        return Ok(());
    };
    let url = server.url();
    for (user, text, level) in [
        ("42", "one", "info"),
        ("42", "two", "error"),
        ("bob", "three", "success"),
    ] {
        cli()
            .args([
                "send",
                &url,
                user,
                text,
                "--level",
                level,
                "--namespace",
                "cli-a",
            ])
            .assert()
            .success()
            .stdout(predicate::str::contains("Queued"));
    }
    cli()
        .args(["count", &url, "42", "--namespace", "cli-a"])
        .assert()
        .success()
        .stdout("2\n");
    cli()
        .args(["count", &url, "42"])
        .assert()
        .success()
        .stdout("0\n");
    let stats = cli()
        .args(["stats", &url, "--namespace", "cli-a", "--json"])
        .assert()
        .success();
    let stats: Value = serde_json::from_slice(&stats.get_output().stdout).expect("JSON");
    assert_eq!(stats["users"], 2);
    assert_eq!(stats["messages"], 3);
    let export = cli()
        .args(["export", &url, "--namespace", "cli-a"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    cli()
        .args(["import", &url, "--namespace", "cli-b"])
        .write_stdin(export.clone())
        .assert()
        .success();
    let a = MessageStore::builder()
        .redis(&url)
        .namespace("cli-a")
        .open()?;
    let b = MessageStore::builder()
        .redis(&url)
        .namespace("cli-b")
        .open()?;
    assert_eq!(contents(&a)?, contents(&b)?);
    assert_eq!(texts(&b.peek(42_u64)?), ["one", "two"]);
    Ok(())
}

// Issue 12: expiry, replace keys and announcements from the shell.

/// Milliseconds since the Unix epoch of `time`.
fn ms(time: std::time::SystemTime) -> u64 {
    u64::try_from(
        time.duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis(),
    )
    .expect("fits")
}

/// Waits (up to 20 s) until the app has taken in every spooled file.
fn wait_taken_in(dir: &TestDir) {
    let new = dir.store_path().join("spool").join("new");
    let started = Instant::now();
    while std::fs::read_dir(&new).map_or(0, Iterator::count) > 0
        && started.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        std::fs::read_dir(&new).map_or(0, Iterator::count),
        0,
        "the spool was not taken in within 20 s"
    );
}

#[test]
fn a_send_with_a_key_and_an_expiry_replaces_and_expires() -> Result<()> {
    let dir = TestDir::new();
    let clock = async_messages::ManualClock::new();
    let app = MessageStore::builder()
        .path(dir.store_path())
        .clock(clock.clone())
        .open()?;
    let store = arg(&dir.store_path()).to_owned();
    let before = std::time::SystemTime::now();
    for text in ["Report 42: 10% done", "Report 42 is ready"] {
        cli()
            .args(["send", &store, "7", text, "--replace-key", "report:42"])
            .args(["--expires-after", "1h 30m", "--level", "success"])
            .assert()
            .success()
            .stdout(predicate::str::contains(
                "Queued a success message for user 7 (expires in 1h 30m; replaces a queued message with the key \"report:42\")",
            ));
    }
    let after = std::time::SystemTime::now();
    cli()
        .args(["send", &store, "7", "unrelated"])
        .assert()
        .success();
    wait_taken_in(&dir);
    let got = app.peek(7_u64)?;
    assert_eq!(texts(&got), ["Report 42 is ready", "unrelated"]);
    assert_eq!(got[0].replace_key(), Some("report:42"));
    let expires = got[0].expires_at().expect("an expiry");
    let ninety = Duration::from_secs(90 * 60);
    assert!(
        expires >= before + ninety - Duration::from_millis(1) && expires <= after + ninety,
        "{expires:?}"
    );
    assert_eq!(got[1].expires_at(), None);
    clock.advance(ninety + Duration::from_secs(1));
    assert_eq!(texts(&app.get_messages(7_u64)?), ["unrelated"]);
    Ok(())
}

#[test]
fn a_send_to_everyone_reaches_users_the_store_has_never_seen() -> Result<()> {
    let dir = TestDir::new();
    let app = dir.open()?;
    app.info(1_u64, "before it")?;
    cli()
        .args(["send", arg(&dir.store_path()), "--everyone"])
        .args(["Maintenance tonight at 22:00", "--level", "warning"])
        .args(["--expires-after", "12h"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "Queued a warning announcement for everyone (expires in 12h)",
        ));
    wait_taken_in(&dir);
    assert_eq!(
        texts(&app.get_messages("never-seen")?),
        ["Maintenance tonight at 22:00"]
    );
    assert_eq!(
        texts(&app.get_messages(1_u64)?),
        ["before it", "Maintenance tonight at 22:00"]
    );
    assert!(app.get_messages("never-seen")?.is_empty(), "got it twice");
    Ok(())
}

#[test]
fn peek_shows_expiry_and_key() -> Result<()> {
    let dir = TestDir::new();
    let expires_at;
    {
        let store = dir.open()?;
        store
            .compose("keyed and expiring", Level::Info)
            .expires_after(Duration::from_secs(3600))
            .replace_key("job:9")
            .to_user(42_u64)?;
        store.info(42_u64, "plain")?;
        expires_at = store.peek(42_u64)?[0].expires_at().expect("an expiry");
    }
    let store = arg(&dir.store_path()).to_owned();
    let out = cli().args(["peek", &store, "42"]).assert().success();
    let text = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[1].contains(" UTC  expires ") && lines[1].ends_with(" UTC  key \"job:9\""),
        "{text}"
    );
    assert!(
        lines[3].ends_with(" UTC"),
        "plain: no expiry, no key: {text}"
    );
    let json = cli()
        .args(["peek", &store, "42", "--json"])
        .assert()
        .success();
    let json: Value = serde_json::from_slice(&json.get_output().stdout).expect("JSON");
    assert_eq!(json["messages"][0]["expires_at_ms"], ms(expires_at));
    assert_eq!(json["messages"][0]["replace_key"], "job:9");
    assert!(json["messages"][1]["expires_at_ms"].is_null());
    assert!(json["messages"][1]["replace_key"].is_null());
    Ok(())
}

#[test]
fn export_then_import_keeps_expiry_times_and_keys() -> Result<()> {
    let source = TestDir::new();
    let hour = Duration::from_secs(3600);
    {
        let store = source.open()?;
        store
            .compose("keyed, for an hour", Level::Success)
            .expires_after(hour)
            .replace_key("report:1")
            .to_user(1_u64)?;
        store.info(1_u64, "plain")?;
        store
            .compose("to three, keyed, for a day", Level::Warning)
            .expires_after(24 * hour)
            .replace_key("maintenance")
            .to_users([UserId::Int(1), UserId::Int(2), UserId::from("al")])?;
    }
    let export = cli()
        .args(["export", arg(&source.store_path())])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let lines: Vec<Value> = String::from_utf8_lossy(&export)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["replace_key"], "report:1");
    assert!(lines[0]["expires_at_ms"].is_u64());
    assert!(lines[1]["replace_key"].is_null() && lines[1]["expires_at_ms"].is_null());
    // A line that expired long ago (hand-written): skipped, with a note.
    let mut input = export.clone();
    input.extend_from_slice(
        br#"{"id":999,"user":3,"level":"info","text":"long gone","expires_at_ms":1000}"#,
    );
    input.push(b'\n');

    let target = TestDir::new();
    cli()
        .args(["import", arg(&target.store_path())])
        .write_stdin(input)
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "Imported 5 messages (3 sends, from 6 lines) for 3 users",
        ))
        .stderr(predicate::str::contains(
            "note: 1 message had expired by now and was skipped",
        ));
    let source = MessageStore::open(source.store_path())?;
    let target = MessageStore::open(target.store_path())?;
    assert!(target.peek(3_u64)?.is_empty());
    for user in [UserId::Int(1), UserId::Int(2), UserId::from("al")] {
        let want = source.peek(&user)?;
        let got = target.peek(&user)?;
        assert_eq!(texts(&got), texts(&want), "{user}");
        for (got, want) in got.iter().zip(&want) {
            assert_eq!(got.replace_key(), want.replace_key());
            assert_eq!(got.level(), want.level());
            // The same expiry time, give or take the moment between the
            // tool reading its clock and the store stamping the send.
            match (got.expires_at(), want.expires_at()) {
                (None, None) => {}
                (Some(got), Some(want)) => assert!(
                    got >= want && got <= want + Duration::from_secs(60),
                    "{user}: {got:?} for {want:?}"
                ),
                other => panic!("{user}: expiry {other:?}"),
            }
        }
    }
    // The bulk send is one send again: one id for its three copies.
    let ids: BTreeSet<_> = [UserId::Int(1), UserId::Int(2), UserId::from("al")]
        .iter()
        .flat_map(|user| target.peek(user).expect("peek"))
        .filter(|m| m.text() == "to three, keyed, for a day")
        .map(|m| m.id())
        .collect();
    assert_eq!(ids.len(), 1);
    Ok(())
}

#[test]
fn on_redis_keys_expiry_and_everyone_are_stored_at_once() -> Result<()> {
    let Some(server) = common::redis::RedisServer::start_or_skip() else {
        return Ok(());
    };
    let url = server.url();
    let send = |args: &[&str]| {
        cli()
            .args(["send", &url, "--namespace", "cli-12"])
            .args(args)
            .assert()
    };
    for text in ["3 new comments", "4 new comments"] {
        send(&[
            "7",
            text,
            "--replace-key",
            "comments",
            "--expires-after",
            "1h",
        ])
        .success()
        .stdout(predicate::str::contains("in the Redis store"));
    }
    send(&["--everyone", "Maintenance tonight", "--expires-after", "2h"])
        .success()
        .stdout(predicate::str::contains(
            "Queued an info announcement for everyone (expires in 2h)",
        ));
    // Below the store's minimum, an announcement is refused (it must reach people).
    send(&["--everyone", "quiet", "--level", "debug"])
        .code(1)
        .stderr(one_sentence().and(predicate::str::contains("debug")));
    send(&["7", "x", "--replace-key", ""])
        .code(1)
        .stderr(one_sentence().and(predicate::str::contains("replace key is empty")));
    let store = MessageStore::builder()
        .redis(&url)
        .namespace("cli-12")
        .open()?;
    let got = store.get_messages(7_u64)?;
    assert_eq!(texts(&got), ["4 new comments", "Maintenance tonight"]);
    assert_eq!(got[0].replace_key(), Some("comments"));
    assert!(got[0].expires_at().is_some() && got[1].expires_at().is_some());
    assert_eq!(
        texts(&store.get_messages("never-seen")?),
        ["Maintenance tonight"]
    );
    Ok(())
}
