//! Sends from other processes through the spool directory: taken in while
//! the app runs and at open, exactly once, in each sender's order; files
//! that cannot be trusted are moved aside and never block the others.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use async_messages::{Error, Level, ManualClock, MessageStore, Result, Spool};
use common::child::{self, Running};
use common::{Rng, TestDir, texts};

/// Waits (up to 20 s) until `user` has `want` messages queued.
fn wait_for_count(store: &MessageStore, user: &str, want: usize) -> Result<usize> {
    let started = Instant::now();
    loop {
        let count = store.count(user)?;
        if count >= want || started.elapsed() > Duration::from_secs(20) {
            return Ok(count);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spool_files(store: &Path, sub: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.join("spool").join(sub))
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_spooled_message_reaches_a_running_app() -> Result<()> {
    let dir = TestDir::new();
    let store = dir.open()?;
    let spool = Spool::open(dir.store_path())?;
    spool.success("alice", "Your export is ready")?;
    spool.message_users(["alice", "bob"], "Maintenance at 22:00", Level::Warning)?;
    assert_eq!(wait_for_count(&store, "alice", 2)?, 2);
    let got = store.get_messages("alice")?;
    assert_eq!(
        texts(&got),
        ["Your export is ready", "Maintenance at 22:00"]
    );
    assert_eq!(got[0].level(), Level::Success);
    assert_eq!(got[1].level(), Level::Warning);
    assert_eq!(
        texts(&wait_and_drain(&store, "bob")?),
        ["Maintenance at 22:00"]
    );
    assert!(spool_files(&dir.store_path(), "new").is_empty());
    Ok(())
}

fn wait_and_drain(store: &MessageStore, user: &str) -> Result<Vec<async_messages::Message>> {
    wait_for_count(store, user, 1)?;
    store.get_messages(user)
}

#[test]
fn a_spooled_message_waits_for_the_next_open_and_is_taken_once() -> Result<()> {
    let dir = TestDir::new();
    drop(dir.open()?);
    let spool = Spool::open(dir.store_path())?;
    spool.info(7_u64, "sent while the app was stopped")?;
    let big: Vec<u64> = (1000..1400).collect();
    spool.message_users(big.clone(), "to 400 users: one bulk record", Level::Info)?;
    assert_eq!(spool_files(&dir.store_path(), "new").len(), 2);
    {
        let store = dir.open()?;
        // Taken in during open: there before the first call.
        assert_eq!(
            texts(&store.get_messages(7_u64)?),
            ["sent while the app was stopped"]
        );
        assert_eq!(store.stats()?.bulk_records, 1);
        assert_eq!(
            texts(&store.get_messages(1000_u64)?),
            ["to 400 users: one bulk record"]
        );
    }
    let store = dir.open()?;
    assert!(store.get_messages(7_u64)?.is_empty(), "taken in twice");
    assert!(store.get_messages(1000_u64)?.is_empty(), "taken in twice");
    assert_eq!(
        texts(&store.get_messages(1399_u64)?),
        ["to 400 users: one bulk record"]
    );
    Ok(())
}

#[test]
fn the_spool_is_owner_only_and_checks_input_like_the_store() -> Result<()> {
    let dir = TestDir::new();
    let spool = Spool::open(dir.store_path())?;
    let mode = std::fs::metadata(dir.store_path().join("spool"))
        .expect("spool dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "spool directory mode {mode:o}");
    assert!(matches!(spool.info(1_u64, ""), Err(Error::EmptyMessage)));
    assert!(matches!(
        spool.info(
            1_u64,
            "x".repeat(MessageStore::DEFAULT_MAX_MESSAGE_BYTES + 1)
        ),
        Err(Error::MessageTooLarge { .. })
    ));
    let long = "u".repeat(async_messages::UserId::MAX_STR_BYTES + 1);
    assert!(matches!(
        spool.message_users(["ok".to_owned(), long], "hi", Level::Info),
        Err(Error::UserIdTooLong { .. })
    ));
    assert!(
        spool_files(&dir.store_path(), "new").is_empty(),
        "a refused send left a file"
    );
    assert!(
        spool_files(&dir.store_path(), "tmp").is_empty(),
        "a refused send left a file"
    );
    let file = dir.store_path().with_file_name("a-file");
    std::fs::write(&file, b"not a store").expect("write a file");
    assert!(matches!(
        Spool::open(&file),
        Err(Error::NotADirectory { .. })
    ));
    Ok(())
}

#[test]
fn untrusted_files_are_moved_aside_and_never_block_the_others() -> Result<()> {
    let dir = TestDir::new();
    drop(dir.open()?);
    let spool = Spool::open(dir.store_path())?;
    spool.info("ann", "first")?;
    let new = dir.store_path().join("spool").join("new");
    let first = spool_files(&dir.store_path(), "new").remove(0);
    // A damaged copy (one flipped bit), under a valid later name.
    let mut bytes = std::fs::read(new.join(&first)).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    let damaged = first.replace(".msg", "0.msg");
    std::fs::write(new.join(&damaged), &bytes).expect("write damaged");
    // A foreign file, and a valid file owned by someone else.
    std::fs::write(new.join("notes.txt"), b"hello").expect("write foreign");
    spool.info("ann", "second")?;
    let foreign_owner = spool_files(&dir.store_path(), "new")
        .into_iter()
        .find(|n| n != &first && n != &damaged && n != "notes.txt")
        .expect("the second file");
    let copy = foreign_owner.replace(".msg", "1.msg");
    std::fs::copy(new.join(&foreign_owner), new.join(&copy)).expect("copy");
    let chowned = std::os::unix::fs::chown(new.join(&copy), Some(4242), Some(4242)).is_ok();
    spool.info("ann", "third")?;

    let store = dir.open()?;
    assert_eq!(
        texts(&store.get_messages("ann")?),
        ["first", "second", "third"]
    );
    let mut rejected = spool_files(&dir.store_path(), "rejected");
    rejected.sort();
    let mut want = vec![damaged, "notes.txt".to_owned()];
    if chowned {
        want.push(copy.clone());
        let uid = std::fs::metadata(dir.store_path().join("spool/rejected").join(&copy))
            .expect("moved")
            .uid();
        assert_eq!(uid, 4242);
    }
    want.sort();
    assert_eq!(rejected, want);
    assert!(spool_files(&dir.store_path(), "new").is_empty());
    Ok(())
}

#[test]
fn one_senders_messages_keep_their_order() -> Result<()> {
    let dir = TestDir::new();
    let store = dir.open_fast()?;
    let spool = Spool::open(dir.store_path())?;
    for i in 0..100 {
        spool.info("ord", format!("m{i:03}"))?;
    }
    assert_eq!(wait_for_count(&store, "ord", 100)?, 100);
    let want: Vec<String> = (0..100).map(|i| format!("m{i:03}")).collect();
    assert_eq!(texts(&store.get_messages("ord")?), want);
    Ok(())
}

/// The child: holds the store open (taking in the spool) until killed.
#[test]
#[ignore = "child process of a_kill_during_intake_loses_nothing_and_doubles_nothing"]
fn spool_intake_child() -> Result<()> {
    let path = std::env::var("SPOOL_STORE").expect("SPOOL_STORE");
    let _store = MessageStore::builder()
        .path(path)
        .lock_timeout(Duration::from_secs(10))
        // Widens the window between storing a message and removing its
        // file, where a kill tests the exactly-once mark.
        .intake_pause_for_tests(Duration::from_millis(5))
        .open()?;
    child::say("open".to_owned());
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn a_kill_during_intake_loses_nothing_and_doubles_nothing() -> Result<()> {
    const SENDERS: usize = 4;
    const EACH: usize = 100;
    let dir = TestDir::new();
    drop(dir.open()?);
    let path = dir.store_path();
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let path = path.clone();
            std::thread::spawn(move || -> Result<()> {
                let spool = Spool::open(&path)?;
                for i in 0..EACH {
                    spool.info("victim", format!("{s}:{i}"))?;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(())
            })
        })
        .collect();
    let mut rng = Rng::new(common::seed_from_env("SPOOL_SEED"));
    let mut kills = 0;
    while senders.iter().any(|t| !t.is_finished()) || kills < 10 {
        let mut command = child::command("spool_intake_child");
        command.env("SPOOL_STORE", &path);
        let mut running = Running::spawn(command);
        assert!(
            running.wait_for(|line| line.ends_with("open")).is_ok(),
            "the child did not open the store"
        );
        std::thread::sleep(Duration::from_millis(rng.below(40)));
        running.kill();
        kills += 1;
    }
    for sender in senders {
        sender.join().expect("sender thread")?;
    }
    let store = dir.open()?;
    let got = texts(&store.get_messages("victim")?);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut last: HashMap<usize, usize> = HashMap::new();
    for text in &got {
        *seen.entry(text.clone()).or_default() += 1;
        let (s, i) = text.split_once(':').expect("s:i");
        let (s, i): (usize, usize) = (s.parse().expect("s"), i.parse().expect("i"));
        if let Some(prev) = last.insert(s, i) {
            assert!(i > prev, "sender {s}: {i} after {prev}");
        }
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "taken in twice: {doubled:?}");
    assert_eq!(
        got.len(),
        SENDERS * EACH,
        "lost {} messages",
        SENDERS * EACH - got.len()
    );
    assert!(spool_files(&path, "new").is_empty());
    eprintln!(
        "spool kill test: {} messages from {SENDERS} senders, {kills} kills of the app, lost 0, doubled 0",
        got.len()
    );
    Ok(())
}

#[test]
fn a_full_disk_at_the_sender_is_disk_full_and_leaves_nothing_behind() -> Result<()> {
    let Some(mount) = common::mount::Mount::tmpfs("1m") else {
        return Ok(());
    };
    let store = mount.point.join("store");
    let spool = Spool::open(&store)?;
    // Fill the disk, leaving less than one message.
    let filler = std::fs::File::create(mount.point.join("filler")).expect("filler");
    let mut left = vec![0_u8; 4096];
    let mut filler = std::io::BufWriter::new(filler);
    while std::io::Write::write_all(&mut filler, &left).is_ok() {}
    drop(filler);
    left.clear();
    let error = spool
        .info("ann", "x".repeat(60_000))
        .expect_err("a full disk must be an error");
    assert!(matches!(error, Error::DiskFull { .. }), "{error:?}");
    assert!(
        spool_files(&store, "new").is_empty(),
        "a failed send left a file"
    );
    assert!(
        spool_files(&store, "tmp").is_empty(),
        "a failed send left a file"
    );
    // Space again: the same spool works.
    std::fs::remove_file(mount.point.join("filler")).expect("free space");
    spool.info("ann", "after")?;
    assert_eq!(spool_files(&store, "new").len(), 1);
    Ok(())
}

#[test]
fn a_spool_opened_by_another_user_than_the_stores_owner_is_refused() -> Result<()> {
    let dir = TestDir::new();
    drop(dir.open()?);
    // Only root can give the store away; elsewhere there is nothing to test.
    let spool_dir = dir.store_path().join("spool");
    if std::os::unix::fs::chown(&spool_dir, Some(4242), Some(4242)).is_err() {
        common::missing_prerequisite("not root, so the spool cannot be given to another user");
        return Ok(());
    }
    let refused = Spool::open(dir.store_path());
    assert!(
        matches!(refused, Err(Error::NotSpoolOwner { owner: 4242, .. })),
        "{refused:?}"
    );
    assert!(spool_files(&dir.store_path(), "new").is_empty());
    Ok(())
}

// Issue 12: expiry, replace keys, announcements and live delivery through
// the spool.

/// Waits (up to 20 s) until the store has taken in every spooled file.
fn wait_taken_in(store: &Path) {
    let started = Instant::now();
    while !spool_files(store, "new").is_empty() && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        spool_files(store, "new").is_empty(),
        "the spool was not taken in within 20 s"
    );
}

/// A store on `clock`, with `default_expiry`.
fn store_with_clock(
    dir: &TestDir,
    clock: &ManualClock,
    default_expiry: Option<Duration>,
) -> Result<MessageStore> {
    MessageStore::builder()
        .path(dir.store_path())
        .clock(clock.clone())
        .default_expiry(default_expiry)
        .open()
}

#[test]
fn a_spooled_send_carries_its_expiry_and_key_and_the_default_expiry_applies() -> Result<()> {
    let dir = TestDir::new();
    let clock = ManualClock::new();
    let store = store_with_clock(&dir, &clock, Some(Duration::from_secs(600)))?;
    let spool = Spool::open(dir.store_path())?;
    let before = SystemTime::now();
    spool
        .compose("Your report is ready", Level::Success)
        .expires_after(Duration::from_secs(3600))
        .replace_key("report:42")
        .to_user("kim")?;
    spool.info("kim", "plain: the store's default expiry")?;
    spool
        .compose("kept until delivered", Level::Info)
        .never_expires()
        .to_user("kim")?;
    let after = SystemTime::now();
    wait_taken_in(&dir.store_path());
    let got = store.peek("kim")?;
    assert_eq!(
        texts(&got),
        [
            "Your report is ready",
            "plain: the store's default expiry",
            "kept until delivered"
        ]
    );
    // The sender fixed the expiry: an hour after its own clock's send.
    let expires = got[0].expires_at().expect("an expiry");
    assert!(
        expires >= before + Duration::from_secs(3600) - Duration::from_millis(1)
            && expires <= after + Duration::from_secs(3600),
        "{expires:?}"
    );
    assert_eq!(got[0].replace_key(), Some("report:42"));
    assert_eq!(got[0].level(), Level::Success);
    // The default counts from the send.
    assert_eq!(
        got[1].expires_at(),
        Some(got[1].sent_at() + Duration::from_secs(600))
    );
    assert_eq!(got[1].replace_key(), None);
    assert_eq!(got[2].expires_at(), None);
    Ok(())
}

#[test]
fn a_spooled_expiring_send_expires() -> Result<()> {
    let dir = TestDir::new();
    let clock = ManualClock::new();
    let store = store_with_clock(&dir, &clock, None)?;
    let spool = Spool::open(dir.store_path())?;
    spool
        .compose("for an hour", Level::Info)
        .expires_after(Duration::from_secs(3600))
        .to_user("eve")?;
    spool.info("eve", "kept")?;
    wait_taken_in(&dir.store_path());
    assert_eq!(store.count("eve")?, 2);
    clock.advance(Duration::from_secs(3601));
    assert_eq!(texts(&store.peek("eve")?), ["kept"]);
    assert_eq!(store.count("eve")?, 1);
    assert_eq!(texts(&store.get_messages("eve")?), ["kept"]);
    Ok(())
}

#[test]
fn a_spooled_send_that_expired_in_the_spool_is_dropped_at_intake() -> Result<()> {
    let dir = TestDir::new();
    drop(dir.open()?);
    let spool = Spool::open(dir.store_path())?;
    spool
        .compose("only for a minute", Level::Info)
        .expires_after(Duration::from_secs(60))
        .to_user("late")?;
    spool
        .compose("for a day", Level::Info)
        .expires_after(Duration::from_secs(86_400))
        .to_user("late")?;
    // The app comes back two hours later.
    let clock = ManualClock::at(SystemTime::now() + Duration::from_secs(7200));
    let store = store_with_clock(&dir, &clock, None)?;
    assert!(spool_files(&dir.store_path(), "new").is_empty());
    assert!(
        spool_files(&dir.store_path(), "rejected").is_empty(),
        "an expired file is dropped, not refused"
    );
    assert_eq!(texts(&store.get_messages("late")?), ["for a day"]);
    Ok(())
}

#[test]
fn a_spooled_keyed_send_replaces_the_queued_one() -> Result<()> {
    let dir = TestDir::new();
    let store = dir.open()?;
    let spool = Spool::open(dir.store_path())?;
    let comments = |n: u32| {
        spool
            .compose(format!("{n} new comments"), Level::Info)
            .replace_key("comments")
            .to_user("kim")
    };
    comments(1)?;
    spool.info("kim", "unrelated")?;
    comments(2)?;
    // A bulk send with the key replaces each recipient's own copy.
    spool
        .compose("3 new comments", Level::Info)
        .replace_key("comments")
        .to_users(["kim", "lee"])?;
    spool
        .compose("lee's own", Level::Info)
        .replace_key("other")
        .to_user("lee")?;
    wait_taken_in(&dir.store_path());
    assert_eq!(texts(&store.peek("kim")?), ["unrelated", "3 new comments"]);
    assert_eq!(
        texts(&store.get_messages("kim")?),
        ["unrelated", "3 new comments"]
    );
    assert_eq!(
        texts(&store.get_messages("lee")?),
        ["3 new comments", "lee's own"]
    );
    // Once delivered, the key is free again.
    comments(4)?;
    wait_taken_in(&dir.store_path());
    assert_eq!(texts(&store.get_messages("kim")?), ["4 new comments"]);
    Ok(())
}

#[test]
fn a_spooled_announcement_reaches_a_new_user_once() -> Result<()> {
    let dir = TestDir::new();
    {
        let store = dir.open()?;
        store.info("old", "before the announcement")?;
        let spool = Spool::open(dir.store_path())?;
        spool
            .compose("Maintenance tonight at 22:00", Level::Warning)
            .expires_after(Duration::from_secs(3600))
            .to_everyone()?;
        wait_taken_in(&dir.store_path());
        assert!(spool_files(&dir.store_path(), "rejected").is_empty());
        assert_eq!(
            texts(&store.get_messages("never-seen")?),
            ["Maintenance tonight at 22:00"]
        );
        assert_eq!(
            texts(&store.get_messages("old")?),
            ["before the announcement", "Maintenance tonight at 22:00"]
        );
        assert!(store.get_messages("never-seen")?.is_empty(), "got it twice");
    }
    // Reopened: those who had it do not get it again; others still do.
    let store = dir.open()?;
    assert!(
        store.get_messages("never-seen")?.is_empty(),
        "again after reopen"
    );
    assert!(store.get_messages("old")?.is_empty(), "again after reopen");
    assert_eq!(
        texts(&store.get_messages(7_u64)?),
        ["Maintenance tonight at 22:00"]
    );
    Ok(())
}

#[test]
fn a_spooled_announcement_below_the_stores_minimum_is_dropped() -> Result<()> {
    let dir = TestDir::new();
    drop(dir.open()?);
    let spool = Spool::open(dir.store_path())?;
    spool.compose("debug for all", Level::Debug).to_everyone()?;
    let store = dir.open()?;
    assert!(spool_files(&dir.store_path(), "new").is_empty());
    assert!(store.get_messages("anyone")?.is_empty());
    Ok(())
}

#[test]
fn a_spooled_send_wakes_a_watch_on_the_store() -> Result<()> {
    let dir = TestDir::new();
    let store = dir.open()?;
    let spool = Spool::open(dir.store_path())?;
    // One user.
    let mut watch = store.watch("watcher")?;
    spool.success("watcher", "your report is ready")?;
    assert!(
        watch.wait_timeout(Duration::from_secs(20)),
        "no wake-up within 20 s"
    );
    assert_eq!(wait_for_count(&store, "watcher", 1)?, 1);
    // A bulk send (one record for many users) wakes its recipients too.
    let mut bulk_watch = store.watch(1399_u64)?;
    spool.message_users(1000..1400_u64, "to 400 users", Level::Info)?;
    assert!(
        bulk_watch.wait_timeout(Duration::from_secs(20)),
        "no wake-up for a bulk send within 20 s"
    );
    wait_taken_in(&dir.store_path());
    assert_eq!(texts(&store.get_messages(1399_u64)?), ["to 400 users"]);
    Ok(())
}

#[test]
fn a_spooled_announcement_wakes_every_watch() -> Result<()> {
    let dir = TestDir::new();
    let store = dir.open()?;
    let spool = Spool::open(dir.store_path())?;
    let mut watch = store.watch("anyone")?;
    spool
        .compose("Maintenance tonight", Level::Warning)
        .expires_after(Duration::from_secs(3600))
        .to_everyone()?;
    assert!(
        watch.wait_timeout(Duration::from_secs(20)),
        "no wake-up within 20 s"
    );
    assert_eq!(
        texts(&store.get_messages("anyone")?),
        ["Maintenance tonight"]
    );
    Ok(())
}

#[test]
fn bad_keys_and_durations_are_typed_errors_and_write_nothing() -> Result<()> {
    let dir = TestDir::new();
    let spool = Spool::open(dir.store_path())?;
    let compose = || spool.compose("hi", Level::Info);
    assert!(matches!(
        compose().replace_key("").to_user(1_u64),
        Err(Error::EmptyReplaceKey)
    ));
    assert!(matches!(
        compose()
            .replace_key("k".repeat(MessageStore::MAX_REPLACE_KEY_BYTES + 1))
            .to_everyone(),
        Err(Error::ReplaceKeyTooLong {
            len: 257,
            limit: 256
        })
    ));
    assert!(matches!(
        compose().expires_after(Duration::ZERO).to_users([1_u64, 2]),
        Err(Error::InvalidExpiry { .. })
    ));
    assert!(matches!(
        compose()
            .expires_after(MessageStore::MAX_EXPIRY + Duration::from_secs(1))
            .to_user(1_u64),
        Err(Error::InvalidExpiry { .. })
    ));
    assert!(matches!(
        spool.compose("", Level::Info).to_everyone(),
        Err(Error::EmptyMessage)
    ));
    // The largest key and expiry are fine.
    compose()
        .replace_key("k".repeat(MessageStore::MAX_REPLACE_KEY_BYTES))
        .expires_after(MessageStore::MAX_EXPIRY)
        .to_user(1_u64)?;
    assert_eq!(spool_files(&dir.store_path(), "new").len(), 1);
    assert!(spool_files(&dir.store_path(), "tmp").is_empty());
    Ok(())
}

/// A version 1 spool file, as an earlier release wrote it.
fn version_1_file(users: &[V1User], text: &str, sent_at_ms: u64) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct V1Entry<'a> {
        users: &'a [V1User],
        level: u8,
        text: &'a str,
        sent_at_ms: u64,
    }
    let mut bytes = vec![1_u8];
    bytes.extend_from_slice(b"AMSP");
    let entry = V1Entry {
        users,
        level: Level::Info as u8,
        text,
        sent_at_ms,
    };
    bytes.extend(
        bincode::serde::encode_to_vec(&entry, bincode::config::standard()).expect("encodes"),
    );
    // FNV-1a, 64 bit, of everything before it.
    let sum = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    bytes.extend_from_slice(&sum.to_le_bytes());
    bytes
}

#[derive(serde::Serialize)]
enum V1User {
    Int(u64),
    Str(String),
}

#[test]
fn version_1_spool_files_are_still_taken_in() -> Result<()> {
    let dir = TestDir::new();
    // Default expiry on: it applies to old files too (they carry none).
    let clock = ManualClock::new();
    drop(store_with_clock(
        &dir,
        &clock,
        Some(Duration::from_secs(60)),
    )?);
    let new = dir.store_path().join("spool").join("new");
    let sent_at_ms = u64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis(),
    )
    .expect("fits");
    std::fs::write(
        new.join(format!("{:020}.1.0.msg", 1)),
        version_1_file(
            &[V1User::Str("old".to_owned()), V1User::Int(5)],
            "from an earlier release",
            sent_at_ms,
        ),
    )
    .expect("write a version 1 file");
    // Then a version 2 file after it, from today's sender.
    Spool::open(dir.store_path())?.info("old", "from today")?;
    let store = store_with_clock(&dir, &clock, Some(Duration::from_secs(60)))?;
    assert!(spool_files(&dir.store_path(), "new").is_empty());
    assert!(spool_files(&dir.store_path(), "rejected").is_empty());
    let got = store.peek("old")?;
    assert_eq!(texts(&got), ["from an earlier release", "from today"]);
    assert_eq!(
        got[0].expires_at(),
        Some(got[0].sent_at() + Duration::from_secs(60))
    );
    assert_eq!(got[0].replace_key(), None);
    assert_eq!(
        texts(&store.get_messages(5_u64)?),
        ["from an earlier release"]
    );
    Ok(())
}

#[test]
fn a_spooled_keyed_send_removes_the_older_record_from_disk() -> Result<()> {
    let dir = TestDir::new();
    {
        let store = dir.open()?;
        let spool = Spool::open(dir.store_path())?;
        for n in 1..=3 {
            spool
                .compose(format!("{n} new comments"), Level::Info)
                .replace_key("comments")
                .to_user(7_u64)?;
            // One at a time: each is taken in before the next is written.
            wait_taken_in(&dir.store_path());
        }
        spool.info(7_u64, "unrelated")?;
        wait_taken_in(&dir.store_path());
        assert_eq!(store.count(7_u64)?, 2);
    }
    // Replaced at write time, not only hidden at read: two records left.
    let db = common::raw_db(&dir.store_path());
    let mut prefix = vec![0x01];
    prefix.extend_from_slice(&7_u64.to_be_bytes());
    let records = db
        .open_tree("messages")
        .expect("messages tree")
        .scan_prefix(&prefix)
        .count();
    assert_eq!(records, 2);
    Ok(())
}
