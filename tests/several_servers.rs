//! Two web demo processes, one Redis server (issue 9, item 8): the demo
//! (`examples/web_demo.rs`, its own `main`, configured by
//! `ASYNC_MESSAGES_REDIS` and `ASYNC_MESSAGES_NAMESPACE`) runs twice, as
//! two child processes on two ports sharing one namespace. A message sent
//! through one demo is shown once, on the page the recipient loads from
//! the other, and never again on either; many messages shown to one user
//! who loads pages from both at once are each shown exactly once.
//!
//! The children are this test binary re-run as its ignored test
//! `web_demo_child`, which calls the demo's `main`.
#![cfg(all(feature = "axum", feature = "redis"))]

mod common;
#[allow(dead_code)] // The page-building parts the tests do not call.
#[path = "../examples/web_demo.rs"]
mod web_demo;

use std::collections::HashMap;
use std::error::Error;
use std::time::{Duration, Instant};

use common::child::Running;
use common::demo::{self, Demo, browser, login, page, send};
use common::redis::RedisServer;

type TestResult = Result<(), Box<dyn Error>>;

const CHILD_ENV: &str = "ASYNC_MESSAGES_DEMO_CHILD";

/// The child process: the web demo's `main`, serving until killed. Does
/// nothing unless started by a test here.
#[test]
#[ignore = "child process: the web demo"]
fn web_demo_child() {
    demo::child(CHILD_ENV, web_demo::main);
}

/// Starts the demo on a free port, its messages on `url` under `namespace`.
/// The process is killed when the returned `Running` is dropped.
fn start_demo(url: &str, namespace: &str) -> Result<(Demo, Running), Box<dyn Error>> {
    let (demo, process) = demo::start(
        "web_demo_child",
        CHILD_ENV,
        &[
            ("ASYNC_MESSAGES_REDIS", url),
            ("ASYNC_MESSAGES_NAMESPACE", namespace),
        ],
    )?;
    let line = process.seen.last().cloned().unwrap_or_default();
    assert!(
        line.contains(&format!(
            "messages on Redis at {url}, namespace {namespace}"
        )),
        "the demo says where its messages are: {line}"
    );
    Ok((demo, process))
}

#[test]
fn a_message_sent_through_one_demo_is_shown_once_by_the_other() -> TestResult {
    let Some(server) = RedisServer::start_or_skip() else {
        return Ok(());
    };
    let url = server.url();
    let (a, _a) = start_demo(&url, "two-demos")?;
    let (b, _b) = start_demo(&url, "two-demos")?;
    // A third demo on another namespace shares the server, not the messages.
    let (other, _other) = start_demo(&url, "another-app")?;

    let ann_on_a = browser()?;
    login(&ann_on_a, &a, "ann")?;
    let bob_on_a = browser()?;
    login(&bob_on_a, &a, "bob")?;
    let bob_on_b = browser()?;
    login(&bob_on_b, &b, "bob")?;
    let bob_elsewhere = browser()?;
    login(&bob_elsewhere, &other, "bob")?;
    for (client, demo, user) in [
        (&ann_on_a, &a, "ann"),
        (&bob_on_a, &a, "bob"),
        (&bob_on_b, &b, "bob"),
        (&bob_elsewhere, &other, "bob"),
    ] {
        assert!(page(client, demo, user)?.is_empty(), "{user} starts empty");
    }

    send(&ann_on_a, &a, "bob", "Sent through A")?;
    assert!(page(&ann_on_a, &a, "ann")?.is_empty(), "not the sender's");
    assert!(
        page(&bob_elsewhere, &other, "bob")?.is_empty(),
        "not another app's"
    );
    assert_eq!(
        page(&bob_on_b, &b, "bob")?,
        ["Sent through A"],
        "shown on B"
    );
    assert!(page(&bob_on_a, &a, "bob")?.is_empty(), "never on A");
    assert!(page(&bob_on_b, &b, "bob")?.is_empty(), "not again on B");

    // And the other way round, the sender on B this time.
    let ann_on_b = browser()?;
    login(&ann_on_b, &b, "ann")?;
    send(&ann_on_b, &b, "bob, ann", "Sent through B")?;
    assert_eq!(
        page(&bob_on_a, &a, "bob")?,
        ["Sent through B"],
        "shown on A"
    );
    assert!(page(&bob_on_b, &b, "bob")?.is_empty(), "never on B");
    assert_eq!(page(&ann_on_a, &a, "ann")?, ["Sent through B"]);
    assert!(page(&ann_on_b, &b, "ann")?.is_empty());
    assert!(page(&bob_on_a, &a, "bob")?.is_empty(), "not again on A");
    assert!(page(&bob_elsewhere, &other, "bob")?.is_empty());
    Ok(())
}

/// Bob has a tab on each demo and reloads both as fast as they answer
/// while Ann sends him messages through A: every message is shown exactly
/// once in total, in send order on each demo.
#[test]
fn pages_loaded_from_both_demos_at_once_show_each_message_once() -> TestResult {
    const MESSAGES: usize = 30;
    let Some(server) = RedisServer::start_or_skip() else {
        return Ok(());
    };
    let url = server.url();
    let (a, _a) = start_demo(&url, "both-at-once")?;
    let (b, _b) = start_demo(&url, "both-at-once")?;
    let ann = browser()?;
    login(&ann, &a, "ann")?;
    let tabs = [(browser()?, &a), (browser()?, &b)];
    for (client, demo) in &tabs {
        login(client, demo, "bob")?;
    }

    let done = std::sync::atomic::AtomicBool::new(false);
    let seen: Vec<Vec<String>> = std::thread::scope(|scope| {
        let readers: Vec<_> = tabs
            .iter()
            .map(|(client, demo)| {
                let done = &done;
                scope.spawn(move || -> Result<Vec<String>, String> {
                    let mut seen = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(60);
                    // One last load after the sender is done.
                    let mut last = false;
                    while !last && Instant::now() < deadline {
                        last = done.load(std::sync::atomic::Ordering::SeqCst);
                        seen.extend(page(client, demo, "bob").map_err(|e| e.to_string())?);
                    }
                    Ok(seen)
                })
            })
            .collect();
        let sent = (0..MESSAGES).try_for_each(|i| send(&ann, &a, "bob", &format!("m{i:02}")));
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let seen = readers
            .into_iter()
            .map(|reader| reader.join().expect("reader thread").map_err(Into::into))
            .collect::<Result<Vec<_>, Box<dyn Error>>>();
        sent.map_err(|e| e.to_string())?;
        seen.map_err(|e| e.to_string())
    })?;

    let mut counts: HashMap<&str, usize> = HashMap::new();
    for text in seen.iter().flatten() {
        *counts.entry(text).or_default() += 1;
    }
    let missing: Vec<String> = (0..MESSAGES)
        .map(|i| format!("m{i:02}"))
        .filter(|text| !counts.contains_key(text.as_str()))
        .collect();
    let doubled: Vec<(&&str, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    for (tab, texts) in seen.iter().enumerate() {
        let mut sorted = texts.clone();
        sorted.sort();
        assert_eq!(&sorted, texts, "tab {tab}: in send order");
    }
    println!(
        "two demos, one Redis: {MESSAGES} messages, shown by A {} and by B {}, missing {}, doubled {}",
        seen[0].len(),
        seen[1].len(),
        missing.len(),
        doubled.len()
    );
    assert!(missing.is_empty(), "never shown: {missing:?}");
    assert!(doubled.is_empty(), "shown twice: {doubled:?}");
    assert_eq!(counts.len(), MESSAGES, "nothing else: {counts:?}");
    Ok(())
}
