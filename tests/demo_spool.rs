//! The web demo with its store in a directory (`ASYNC_MESSAGES_PATH`) and
//! the command-line tool sending from a shell while it runs (issue 11): the
//! message goes through the store's spool and shows on the user's next
//! page, once.
#![cfg(all(feature = "axum", feature = "cli"))]

mod common;
#[allow(dead_code)] // The page-building parts the tests do not call.
#[path = "../examples/web_demo.rs"]
mod web_demo;

use std::error::Error;
use std::process::Command;
use std::time::{Duration, Instant};

use common::demo::{self, browser, login, page};

const CHILD_ENV: &str = "ASYNC_MESSAGES_DEMO_CHILD";

/// The child process: the web demo's `main`, serving until killed.
#[test]
#[ignore = "child process: the web demo"]
fn web_demo_child() {
    demo::child(CHILD_ENV, web_demo::main);
}

#[test]
fn a_message_sent_from_a_shell_shows_on_the_users_next_page() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let store_str = store.to_str().ok_or("a UTF-8 temp path")?;
    let (demo, _process) = demo::start(
        "web_demo_child",
        CHILD_ENV,
        &[("ASYNC_MESSAGES_PATH", store_str)],
    )?;
    let alice = browser()?;
    login(&alice, &demo, "alice")?;
    assert!(page(&alice, &demo, "alice")?.is_empty());

    // As from a shell: async-messages send "$ASYNC_MESSAGES_PATH" alice "…"
    let sent = Command::new(env!("CARGO_BIN_EXE_async-messages"))
        .args([
            "send",
            store_str,
            "alice",
            "Your <b>export</b> is ready",
            "--level",
            "success",
        ])
        .output()?;
    assert!(
        sent.status.success(),
        "async-messages send failed: {}",
        String::from_utf8_lossy(&sent.stderr)
    );

    // Taken in by the running demo within milliseconds; allow a busy machine.
    let started = Instant::now();
    let shown = loop {
        let shown = page(&alice, &demo, "alice")?;
        if !shown.is_empty() || started.elapsed() > Duration::from_secs(10) {
            break shown;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Escaped on the page: the text is data.
    assert_eq!(shown, ["Your &lt;b&gt;export&lt;/b&gt; is ready"]);
    assert!(page(&alice, &demo, "alice")?.is_empty(), "shown once");
    Ok(())
}
