//! A store already open, in this process or another, is refused with a
//! typed error naming the path, within seconds, never a hang.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_messages::{Error, MessageStore, Result};
use common::TestDir;

const HOLDER_ENV: &str = "ASYNC_MESSAGES_LOCK_HOLDER";

#[test]
fn a_second_open_in_this_process_is_refused_at_once() -> Result<()> {
    let dir = TestDir::new();
    let store = dir.open()?;
    store.info(1_u64, "kept")?;
    let error = MessageStore::open(dir.store_path()).unwrap_err();
    assert!(
        matches!(&error, Error::AlreadyOpen { path } if *path == dir.store_path()),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains(&dir.store_path().display().to_string()),
        "the message names the path: {error}"
    );
    // The first handle is unaffected.
    assert_eq!(store.get_messages(1_u64)?.len(), 1);
    Ok(())
}

/// Run by the test below in a child process: holds the store open until its
/// stdin closes.
#[test]
#[ignore = "helper process for a_store_open_in_another_process_is_refused"]
fn lock_holder() -> Result<()> {
    let Ok(path) = std::env::var(HOLDER_ENV) else {
        return Ok(());
    };
    let store = MessageStore::open(path)?;
    store.info(1_u64, "from the holder")?;
    println!("holding");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    Ok(())
}

#[test]
fn a_store_open_in_another_process_is_refused() -> Result<()> {
    let dir = TestDir::new();
    let mut child = Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "--exact",
            "lock_holder",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLDER_ENV, dir.store_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the holder");
    // Keep reading the child's stdout to its end, so it never writes to a
    // closed pipe.
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout"))
        .lines()
        .map_while(std::io::Result::ok);
    let holding = lines.any(|line| line.contains("holding"));
    assert!(holding, "the holder process did not open the store");

    let started = Instant::now();
    let result = MessageStore::builder()
        .path(dir.store_path())
        .lock_timeout(Duration::from_millis(500))
        .open();
    let waited = started.elapsed();
    let error = result.unwrap_err();
    assert!(
        matches!(&error, Error::AlreadyOpen { path } if *path == dir.store_path()),
        "{error:?}"
    );
    // A hang guard, not a speed measurement: the timeout is 0.5 s.
    assert!(waited < Duration::from_secs(30), "open hung for {waited:?}");

    // Once the holder exits, the store opens and has its message.
    drop(child.stdin.take());
    lines.for_each(drop);
    let status = child.wait().expect("wait for the holder");
    assert!(status.success());
    let store = dir.open()?;
    assert_eq!(store.get_messages(1_u64)?.len(), 1);
    Ok(())
}

#[test]
fn a_path_that_is_a_file_is_refused() -> Result<()> {
    let dir = TestDir::new();
    std::fs::create_dir_all(dir.store_path().parent().expect("parent")).expect("mkdir");
    std::fs::write(dir.store_path(), b"not a store").expect("write");
    let error = dir.open().unwrap_err();
    assert!(matches!(&error, Error::NotADirectory { path } if *path == dir.store_path()));
    assert_eq!(
        std::fs::read(dir.store_path()).expect("read"),
        b"not a store"
    );
    Ok(())
}

#[test]
fn a_builder_without_a_path_is_refused() {
    assert!(matches!(MessageStore::builder().open(), Err(Error::NoPath)));
}
