//! The framework-agnostic request hook: who gets messages, and when they
//! are removed.

mod common;

use async_messages::{DeliveryMode, DrainPolicy, RequestHook, RequestKind, Result, UserId};
use std::time::{Duration, Instant};

use common::engines::{self, Engine};
use common::texts;

const BROWSER_ACCEPT: &str =
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";

fn page() -> RequestKind<'static> {
    RequestKind::new("GET")
        .header("Accept", BROWSER_ACCEPT)
        .header("Sec-Fetch-Mode", "navigate")
        .header("Sec-Fetch-Dest", "document")
}

fn user(id: u64) -> Option<UserId> {
    Some(UserId::from(id))
}

#[test]
fn page_navigations_are_recognised() {
    assert!(page().is_page_navigation());
    assert!(RequestKind::new("HEAD").is_page_navigation());
    assert!(
        RequestKind::new("get")
            .header("accept", "TEXT/HTML")
            .is_page_navigation()
    );
    let not_pages = [
        RequestKind::new("POST").header("Accept", BROWSER_ACCEPT),
        page().header("X-Requested-With", "XMLHttpRequest"),
        page().header("Sec-Fetch-Mode", "cors"),
        page().header("Sec-Fetch-Dest", "image"),
        RequestKind::new("GET").header("Accept", "application/json"),
        RequestKind::new("GET").header("Accept", "*/*"),
        RequestKind::new("GET").header("Accept", "image/avif,image/webp,*/*;q=0.8"),
    ];
    for request in not_pages {
        assert!(!request.is_page_navigation(), "{request:?}");
    }
}

fn only_pages_of_known_users_take_messages(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    let hook = RequestHook::new(store.clone());
    store.info(1_u64, "hello")?;
    assert!(hook.on_request(None, &page()).is_empty());
    let xhr = page().header("X-Requested-With", "XMLHttpRequest");
    assert!(hook.on_request(user(1), &xhr).is_empty());
    assert!(hook.on_request(user(2), &page()).is_empty());
    let delivery = hook.on_request(user(1), &page());
    assert_eq!(texts(delivery.messages()), ["hello"]);
    delivery.finish(200);
    assert!(hook.on_request(user(1), &page()).is_empty());
    Ok(())
}

fn at_most_once_removes_even_if_the_page_fails(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    let hook = RequestHook::new(store.clone());
    store.info(1_u64, "gone")?;
    hook.on_request(user(1), &page()).finish(500);
    assert_eq!(store.count(1_u64)?, 0);
    Ok(())
}

fn at_least_once_keeps_messages_until_a_response_succeeds(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    let hook = RequestHook::new(store.clone()).mode(DeliveryMode::AtLeastOnce);
    store.info(1_u64, "important")?;

    // The handler fails: the messages come back.
    let failed = hook.on_request(user(1), &page());
    assert_eq!(texts(failed.messages()), ["important"]);
    // While leased, another request does not get them too.
    assert!(hook.on_request(user(1), &page()).is_empty());
    failed.finish(500);

    // Dropped without finishing (a panicking handler): they come back too.
    drop(hook.on_request(user(1), &page()));

    store.info(1_u64, "later")?;
    let shown = hook.on_request(user(1), &page());
    assert_eq!(texts(shown.messages()), ["important", "later"]);
    shown.finish(303);
    assert!(hook.on_request(user(1), &page()).is_empty());
    assert_eq!(store.count(1_u64)?, 0);
    Ok(())
}

/// On Redis, how long the dying child's lease hides the message.
const LEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Run in a child process: leases the messages, then dies before answering.
#[test]
#[ignore = "child process of leased_messages_survive_the_process_dying"]
fn lease_then_die() -> Result<()> {
    let Some(builder) = engines::child_builder() else {
        return Ok(());
    };
    let store = builder.lease_timeout(LEASE_TIMEOUT).open()?;
    let hook = RequestHook::new(store).mode(DeliveryMode::AtLeastOnce);
    let delivery = hook.on_request(user(1), &page());
    println!("leased {}", delivery.messages().len());
    std::process::abort();
}

/// On sled the lease dies with the process (the next open has the message
/// back). Redis outlives the process: the message stays hidden until the
/// dead process's lease times out, then comes back. Not in memory, which
/// no other process can open.
fn leased_messages_survive_the_process_dying(engine: Engine) -> Result<()> {
    let mut store = engine.open()?;
    store.info(1_u64, "survives")?;
    if engine == Engine::Sled {
        // One process at a time.
        store.close();
    }
    let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "lease_then_die", "--ignored", "--nocapture"])
        .envs(store.child_env())
        .stderr(std::process::Stdio::null())
        .output()
        .expect("run the child");
    assert!(!output.status.success(), "the child must die, not finish");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("leased 1"),
        "the child leased the message: {stdout}"
    );
    if engine == Engine::Sled {
        store.reopen()?;
        assert_eq!(texts(&store.get_messages(1_u64)?), ["survives"]);
        return Ok(());
    }
    assert!(
        store.get_messages(1_u64)?.is_empty(),
        "the dead process's lease still holds the message"
    );
    let deadline = Instant::now() + LEASE_TIMEOUT + Duration::from_secs(10);
    loop {
        let got = store.get_messages(1_u64)?;
        if !got.is_empty() {
            assert_eq!(texts(&got), ["survives"]);
            return Ok(());
        }
        assert!(
            Instant::now() < deadline,
            "the message did not come back after the lease timeout"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn policies_can_be_widened_or_replaced(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    let xhr = RequestKind::new("POST").header("X-Requested-With", "XMLHttpRequest");
    store.info(1_u64, "a")?;
    let all = RequestHook::new(store.clone()).policy(DrainPolicy::AllRequests);
    assert_eq!(all.on_request(user(1), &xhr).messages().len(), 1);
    store.info(1_u64, "b")?;
    let posts_only = RequestHook::new(store.clone())
        .policy(DrainPolicy::Custom(|request| request.method() == "POST"));
    assert!(posts_only.on_request(user(1), &page()).is_empty());
    assert_eq!(posts_only.on_request(user(1), &xhr).messages().len(), 1);
    Ok(())
}

engine_tests! {
    only_pages_of_known_users_take_messages,
    at_most_once_removes_even_if_the_page_fails,
    at_least_once_keeps_messages_until_a_response_succeeds,
    leased_messages_survive_the_process_dying: Sled | Redis,
    policies_can_be_widened_or_replaced,
}
