//! Redis unavailable (issue 9, item 5). While the server is stopped or
//! frozen, a store handle's calls fail with `Error::Redis` naming the URL
//! within a bounded time (no hang), `may_have_messages` says "maybe", and
//! the same handle works again once the server is back, with nothing
//! acknowledged lost. The request hook and `MessagesLayer` still serve the
//! page (200, without messages) and log the error; the next page after the
//! server is back shows the queued messages.
#![cfg(feature = "redis")]

mod common;

use std::error::Error as StdError;
use std::fmt::Debug;
use std::io::Write;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use async_messages::{
    DeliveryMode, Error, Level, MessageStore, RequestHook, RequestKind, Result, UserId,
};
use common::redis::RedisServer;
use common::texts;

type TestResult = std::result::Result<(), Box<dyn StdError>>;

/// A call with the server down must return within this. The engine's
/// timeouts are 2 s (a call may connect twice; a commit retries for 4 s):
/// generous, for a busy machine. Not a speed check: a bound against hangs.
const BOUND: Duration = Duration::from_secs(15);

/// Runs `call`, failing the test if it took longer than [`BOUND`].
fn bounded<T>(what: &str, call: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = call();
    let took = started.elapsed();
    eprintln!("{what}: returned after {took:.1?}");
    assert!(
        took < BOUND,
        "{what} took {took:?} with the server unavailable (bound {BOUND:?})"
    );
    out
}

/// Asserts that `result` is `Error::Redis` naming `url`, in its field and
/// in its message.
fn assert_redis_error<T: Debug>(what: &str, result: Result<T>, url: &str) {
    match &result {
        Err(error @ Error::Redis { url: named, .. }) => {
            assert_eq!(named, url, "{what}: the error names the server");
            assert!(
                error.to_string().contains(url),
                "{what}: the message names the server: {error}"
            );
        }
        other => panic!("{what}: expected Error::Redis naming {url}, got {other:?}"),
    }
}

fn open(url: &str, namespace: &str, lease_timeout: Duration) -> Result<MessageStore> {
    MessageStore::builder()
        .redis(url)
        .namespace(namespace)
        .lease_timeout(lease_timeout)
        .open()
}

/// Every kind of call fails, each within the bound, and names `url`.
fn assert_all_calls_fail(store: &MessageStore, url: &str) {
    let many: Vec<u64> = (1_000..1_300).collect();
    assert_redis_error(
        "send",
        bounded("send", || store.info(1_u64, "during the outage")),
        url,
    );
    assert_redis_error(
        "send to a few",
        bounded("send to a few", || {
            store.message_users([1_u64, 2], "during the outage, to a few", Level::Info)
        }),
        url,
    );
    assert_redis_error(
        "bulk send",
        bounded("bulk send", || {
            store.message_users(many, "during the outage, to many", Level::Info)
        }),
        url,
    );
    assert_redis_error(
        "get_messages",
        bounded("get_messages", || store.get_messages(1_u64)),
        url,
    );
    assert_redis_error("peek", bounded("peek", || store.peek(1_u64)), url);
    assert_redis_error("count", bounded("count", || store.count(1_u64)), url);
    assert_redis_error(
        "lease_messages",
        bounded("lease_messages", || store.lease_messages(1_u64)),
        url,
    );
    // "Maybe": so that a caller that checks first still calls the drain,
    // which reports the error.
    assert!(bounded("may_have_messages", || store.may_have_messages(1_u64)));
    assert!(bounded("may_have_messages", || {
        store.may_have_messages("nobody")
    }));
}

#[test]
fn a_stopped_server_fails_calls_in_bounded_time_and_the_same_handle_recovers() -> TestResult {
    let Some(mut server) = RedisServer::start_or_skip() else {
        return Ok(());
    };
    let url = server.url();
    let store = open(&url, "stopped", Duration::from_secs(1))?;
    store.info(1_u64, "before 1")?;
    store.warning(1_u64, "before 2")?;
    store.message_users([1_u64, 2], "before 3", Level::Success)?;
    let many: Vec<u64> = (1_000..1_300).collect();
    store.message_users(
        many.iter().copied().chain([2]),
        "before, to many",
        Level::Info,
    )?;
    store.info(3_u64, "leased before")?;
    let lease = store.lease_messages(3_u64)?;
    assert_eq!(texts(lease.messages()), ["leased before"]);

    server.stop();
    assert_all_calls_fail(&store, &url);
    // A lease held across the outage: its commit keeps trying for a while,
    // then gives up without an answer (it may not claim a removal).
    assert_redis_error("commit", bounded("commit", || lease.commit()), &url);

    server.restart();
    // The same handle, not reopened: its first call works.
    assert_eq!(
        texts(&store.get_messages(1_u64)?),
        ["before 1", "before 2", "before 3"],
        "what was acknowledged before the stop is there, once, and nothing \
         refused during it"
    );
    assert_eq!(
        texts(&store.get_messages(2_u64)?),
        ["before 3", "before, to many"]
    );
    assert_eq!(texts(&store.get_messages(1_100_u64)?), ["before, to many"]);
    assert!(!store.may_have_messages(1_u64));
    store.info(1_u64, "after")?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["after"]);
    // The uncommitted lease comes back once it times out (1 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    let back = loop {
        let got = store.get_messages(3_u64)?;
        if !got.is_empty() || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(texts(&back), ["leased before"]);
    for user in [1_u64, 2, 3, 1_100] {
        assert_eq!(store.count(user)?, 0, "user {user}");
    }
    Ok(())
}

/// SIGSTOP/SIGCONT of a process, by the shell's `kill` (std has neither
/// signal). The process is continued when this is dropped, also on a panic.
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32) -> Frozen {
        signal("STOP", pid);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal("CONT", self.0);
    }
}

fn signal(name: &str, pid: u32) {
    let status = std::process::Command::new("sh")
        .args(["-c", "kill -\"$1\" \"$2\"", "sh", name, &pid.to_string()])
        .status()
        .expect("run sh");
    assert!(status.success(), "kill -{name} {pid}: {status}");
}

/// A frozen server accepts connections (the kernel does) but never answers:
/// only the engine's timeouts end a call. Calls that timed out are in doubt:
/// the server runs them when it continues (a send is then stored, a lease
/// hides its messages until it times out), so afterwards each acknowledged
/// message is delivered exactly once and the in-doubt send at most once.
#[test]
fn a_frozen_server_fails_calls_in_bounded_time_and_in_doubt_calls_stay_at_most_once() -> TestResult
{
    let Some(server) = RedisServer::start_or_skip() else {
        return Ok(());
    };
    let url = server.url();
    let store = open(&url, "frozen", Duration::from_secs(1))?;
    store.info(1_u64, "before 1")?;
    store.info(1_u64, "before 2")?;
    let pid: u32 = server
        .command(&["INFO", "server"])
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
        .ok_or("no process_id in INFO server")?;

    let frozen = Frozen::new(pid);
    assert_redis_error(
        "send",
        bounded("send", || store.info(1_u64, "in doubt")),
        &url,
    );
    assert_redis_error(
        "get_messages",
        bounded("get_messages", || store.get_messages(1_u64)),
        &url,
    );
    assert!(bounded("may_have_messages", || store.may_have_messages(1_u64)));
    drop(frozen);

    // The frozen server ran the timed-out lease when it continued: the
    // messages come back after the lease timeout (1 s).
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        got.extend(texts(&store.get_messages(1_u64)?));
        if got.iter().any(|t| t == "before 1") && store.count(1_u64)? == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let once = |text: &str| got.iter().filter(|t| *t == text).count();
    assert_eq!(once("before 1"), 1, "{got:?}");
    assert_eq!(once("before 2"), 1, "{got:?}");
    assert!(once("in doubt") <= 1, "{got:?}");
    assert_eq!(got.len(), 2 + once("in doubt"), "nothing else: {got:?}");
    eprintln!(
        "frozen server: the in-doubt send was {} (the server ran it after it continued)",
        if once("in doubt") == 1 {
            "stored"
        } else {
            "not stored"
        }
    );
    Ok(())
}

// ------------------------------------------------ the hook and the layer

/// Everything logged through `tracing` in this test binary.
fn buffer() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Installs the subscriber that writes into [`buffer`] (once).
fn capture_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
    });
}

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        buffer()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The logged lines that mention `needle` (tests run in parallel: each
/// looks for its own server's URL).
fn logged(needle: &str) -> Vec<String> {
    let logs = buffer().lock().unwrap_or_else(PoisonError::into_inner);
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|line| line.contains(needle))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_request_hook_serves_no_messages_and_logs_while_redis_is_down() -> TestResult {
    capture_logs();
    let Some(mut server) = RedisServer::start_or_skip() else {
        return Ok(());
    };
    let url = server.url();
    let store = open(&url, "hook", Duration::from_secs(5))?;
    let page = RequestKind::new("GET").header("accept", "text/html");
    for (user, mode) in [
        ("ann", DeliveryMode::AtMostOnce),
        ("bob", DeliveryMode::AtLeastOnce),
    ] {
        let hook = RequestHook::new(store.clone()).mode(mode);
        store.info(user, "queued before the outage")?;
        server.stop();
        assert!(hook.may_deliver(Some(&UserId::from(user)), &page));
        let delivery = bounded("on_request", || {
            hook.on_request(Some(UserId::from(user)), &page)
        });
        assert!(delivery.is_empty(), "{mode:?}: {:?}", delivery.messages());
        delivery.finish(200);
        let errors = logged(&url);
        assert!(
            errors
                .iter()
                .any(|line| line.contains("ERROR") && line.contains("could not take")),
            "{mode:?}: the error is logged with the server's URL: {errors:?}"
        );

        server.restart();
        let delivery = hook.on_request(Some(UserId::from(user)), &page);
        assert_eq!(
            texts(delivery.messages()),
            ["queued before the outage"],
            "{mode:?}"
        );
        delivery.finish(200);
        assert!(
            hook.on_request(Some(UserId::from(user)), &page).is_empty(),
            "{mode:?}: shown once"
        );
    }
    Ok(())
}

#[cfg(feature = "axum")]
mod layer {
    use std::net::SocketAddr;

    use async_messages::{Messages, MessagesLayer};
    use axum::Router;
    use axum::routing::get;

    use super::*;

    /// A page listing the request's messages, one `<li>` each; the user is
    /// the `x-user` header.
    fn app(store: MessageStore, mode: DeliveryMode) -> Router {
        async fn page(messages: Messages) -> axum::response::Html<String> {
            let items: String = messages
                .iter()
                .map(|m| format!("<li>{}</li>", m.text()))
                .collect();
            axum::response::Html(format!(
                "<ul>{items}</ul><p>{} message(s)</p>",
                messages.len()
            ))
        }
        let layer = MessagesLayer::new(store, |parts: &axum::http::request::Parts| {
            let user = parts.headers.get("x-user")?.to_str().ok()?;
            Some(UserId::from(user))
        })
        .mode(mode);
        Router::new().route("/", get(page)).layer(layer)
    }

    struct Served {
        addr: SocketAddr,
        _runtime: tokio::runtime::Runtime,
    }

    fn serve(app: Router) -> std::result::Result<Served, Box<dyn StdError>> {
        let (addr, runtime) = crate::common::web::serve_app(app)?;
        Ok(Served {
            addr,
            _runtime: runtime,
        })
    }

    /// Loads the page as `user`, as a browser would: status and body.
    fn load(
        client: &reqwest::blocking::Client,
        served: &Served,
        user: &str,
    ) -> std::result::Result<(u16, String), Box<dyn StdError>> {
        let response = client
            .get(format!("http://{}/", served.addr))
            .header("accept", "text/html")
            .header("x-user", user)
            .send()?;
        Ok((response.status().as_u16(), response.text()?))
    }

    #[test]
    fn the_layer_serves_the_page_without_messages_and_logs_while_redis_is_down() -> TestResult {
        capture_logs();
        let Some(mut server) = RedisServer::start_or_skip() else {
            return Ok(());
        };
        let url = server.url();
        let store = open(&url, "layer", Duration::from_secs(5))?;
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        for (user, mode) in [
            ("ann", DeliveryMode::AtMostOnce),
            ("bob", DeliveryMode::AtLeastOnce),
        ] {
            let served = serve(app(store.clone(), mode))?;
            store.info(user, "queued before the outage")?;
            server.stop();
            let logged_before = logged(&url).len();
            let (status, body) = bounded("a page", || load(&client, &served, user))?;
            assert_eq!(status, 200, "{mode:?}: {body}");
            assert!(body.contains("0 message(s)"), "{mode:?}: {body}");
            let errors = logged(&url);
            assert!(
                errors[logged_before..]
                    .iter()
                    .any(|line| line.contains("ERROR") && line.contains("could not take")),
                "{mode:?}: the error is logged with the server's URL: {errors:?}"
            );

            server.restart();
            let (status, body) = load(&client, &served, user)?;
            assert_eq!(status, 200);
            assert!(
                body.contains("<li>queued before the outage</li>"),
                "{mode:?}: the next page shows it: {body}"
            );
            let (_, body) = load(&client, &served, user)?;
            assert!(
                body.contains("0 message(s)"),
                "{mode:?}: shown once: {body}"
            );
        }
        Ok(())
    }
}
