//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod child;
pub mod clock;
#[cfg(feature = "axum")]
pub mod demo;
pub mod engines;
pub mod mount;
pub mod redis;
#[cfg(feature = "axum")]
pub mod web;

use std::path::PathBuf;

use async_messages::{Durability, MessageStore, Result};

/// A fresh directory for one test, removed when dropped.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> TestDir {
        TestDir {
            dir: tempfile::Builder::new()
                .prefix("async-messages-test-")
                .tempdir()
                .expect("cannot create a temporary directory"),
        }
    }

    /// The store's path inside the directory.
    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Opens the store with default settings.
    pub fn open(&self) -> Result<MessageStore> {
        MessageStore::open(self.store_path())
    }

    /// Opens the store with periodic durability (faster, for tests that do
    /// not test durability).
    pub fn open_fast(&self) -> Result<MessageStore> {
        MessageStore::builder()
            .path(self.store_path())
            .durability(Durability::Periodic(std::time::Duration::from_millis(100)))
            .open()
    }
}

/// The texts of some messages.
pub fn texts(messages: &[async_messages::Message]) -> Vec<String> {
    messages.iter().map(|m| m.text().to_owned()).collect()
}

/// Opens a closed store's sled database directly, to read or write raw
/// records. Waits for the lock that a just-dropped store's background
/// threads may still hold for a moment.
pub fn raw_db(path: &std::path::Path) -> sled::Db {
    let started = std::time::Instant::now();
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(_) if started.elapsed() < std::time::Duration::from_secs(5) => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => panic!("cannot open the closed store with sled: {e}"),
        }
    }
}

/// A small deterministic generator (xorshift64*), so a failing seed replays.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Between 1 and `most` of the numbers below `n`, in random order.
    pub fn some_of(&mut self, n: usize, most: u64) -> Vec<usize> {
        let mut some: Vec<usize> = (0..n).collect();
        for i in 0..some.len() {
            let j = i + self.below((some.len() - i) as u64) as usize;
            some.swap(i, j);
        }
        some.truncate(1 + self.below(most) as usize);
        some
    }
}

/// The seed in environment variable `var`, or one from the clock: print it
/// so that a failing run can be replayed.
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// Handles a test whose prerequisite (root, a mount, a tool) is missing:
/// with env `CI` set, the test fails; otherwise it prints a skip line and
/// the caller returns (passes). The line goes straight to stderr, past the
/// test harness's output capture, so that a skip is seen in a plain
/// `cargo test` run.
pub fn missing_prerequisite(reason: &str) {
    let line = skip_or_fail(reason, std::env::var_os("CI").is_some());
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
}

/// The rule of [`missing_prerequisite`], with `ci` given (testable without
/// changing the environment): panics if `ci`, else returns the skip line.
pub fn skip_or_fail(reason: &str, ci: bool) -> String {
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    assert!(
        !ci,
        "{test}: {reason}; CI is set, so a missing prerequisite fails the test instead of skipping it"
    );
    format!("SKIPPED {test}: {reason} (set CI to make this a failure)\n")
}

/// Sends `request` through an axum app in-process and reads the whole body.
#[cfg(feature = "axum")]
pub async fn call(
    app: &axum::Router,
    request: axum::http::Request<axum::body::Body>,
) -> (axum::http::StatusCode, String) {
    use tower::ServiceExt;
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    (status, String::from_utf8_lossy(&bytes).into_owned())
}
