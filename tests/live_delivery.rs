//! Live delivery (issue 12): `LiveMessages` turns a user's queue into
//! server-sent events, and a message goes either to an open stream or to a
//! later page load, never both and never lost.
//!
//! The first tests read the stream in process, on every engine; the last
//! ones drive the web demo (`examples/web_demo.rs`) over real HTTP with
//! reqwest: `GET /events` as one user, sends from another session.
//!
//! Waits use deadlines, never measured times. "Nothing else comes" is
//! checked over a short window: such a check can miss a late duplicate
//! but never fails a correct run.
#![cfg(feature = "axum")]

mod common;
#[allow(dead_code)] // `main` and helpers the test does not call.
#[path = "../examples/web_demo.rs"]
mod web_demo;

use std::error::Error;
use std::future::Future;
use std::time::Duration;

use async_messages::{DeliveryMode, LiveMessages, MessageStore, RequestKind};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::IntoResponse;
use common::engines::{Engine, fast};
use common::texts;
use common::web::{Events, LiveMessage, SseEvent};

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

/// What the issue asks of live delivery: a sent message reaches the open
/// stream within 2 s.
const WITHIN: Duration = Duration::from_secs(2);

/// For what must happen but has no promised speed (a busy machine).
const PATIENCE: Duration = Duration::from_secs(20);

/// How long a stream is watched for something that must not come.
const QUIET: Duration = Duration::from_millis(500);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// The events `LiveMessages` sends for `user`, read in process.
fn live(store: &MessageStore, user: &str) -> Events {
    Events::of_response(LiveMessages::new(store.clone(), user).into_response())
}

/// Reads until `events` has nothing to send: an open stream that is
/// waiting (its watch made, its first lease done and committed).
async fn settled(events: &mut Events) -> TestResult {
    while let Some(event) = events.try_next(QUIET).await? {
        assert_eq!(event.data, None, "nothing was queued, yet: {event:?}");
    }
    Ok(())
}

/// The id reset that follows a committed batch.
async fn committed(events: &mut Events) -> TestResult {
    let event = events.next(PATIENCE).await?;
    assert_eq!(
        event,
        SseEvent {
            id: Some(String::new()),
            data: None
        },
        "the commit's id reset"
    );
    Ok(())
}

fn an_open_stream_gets_a_message_sent_to_its_user(engine: Engine) -> TestResult {
    let store = engine.open_fast()?;
    runtime().block_on(async {
        let mut events = live(&store, "ann");
        settled(&mut events).await?;
        let id = store
            .success("ann", "Your report is ready <b>now</b>")?
            .ok_or("stored")?;
        store.info("bob", "For Bob")?;
        let message = events.next_message(PATIENCE).await?;
        assert_eq!(
            message,
            LiveMessage {
                event_id: id.to_string(),
                id: id.get(),
                level: "success".into(),
                text: "Your report is ready <b>now</b>".into(),
            },
            "the text is data, exactly as sent"
        );
        committed(&mut events).await?;
        assert!(store.get_messages("ann")?.is_empty(), "shown again");
        assert_eq!(texts(&store.get_messages("bob")?), ["For Bob"]);
        Ok(())
    })
}

fn messages_queued_before_the_stream_opened_come_first_in_order(engine: Engine) -> TestResult {
    let store = engine.open_fast()?;
    for text in ["one", "two", "three"] {
        store.info("ann", text)?;
    }
    runtime().block_on(async {
        let mut events = live(&store, "ann");
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(events.next_message(PATIENCE).await?.text);
        }
        assert_eq!(got, ["one", "two", "three"]);
        committed(&mut events).await?;
        assert_eq!(store.count("ann")?, 0);
        Ok(())
    })
}

fn a_stream_dropped_before_the_server_took_on_leaves_the_message_queued(
    engine: Engine,
) -> TestResult {
    let store = engine.open_fast()?;
    store.info("ann", "Kept for the next page")?;
    runtime().block_on(async {
        // The server took the event, but never asked for the next one:
        // the client went away.
        let mut events = live(&store, "ann");
        assert_eq!(
            events.next_message(PATIENCE).await?.text,
            "Kept for the next page"
        );
        drop(events);
        assert_eq!(
            texts(&store.get_messages("ann")?),
            ["Kept for the next page"],
            "the next page load shows it"
        );

        // The control: asking for more commits it.
        store.info("ann", "Taken by the stream")?;
        let mut events = live(&store, "ann");
        assert_eq!(
            events.next_message(PATIENCE).await?.text,
            "Taken by the stream"
        );
        committed(&mut events).await?;
        assert!(store.get_messages("ann")?.is_empty());
        Ok(())
    })
}

fn a_reconnect_is_not_sent_what_the_client_already_has(engine: Engine) -> TestResult {
    let store = engine.open_fast()?;
    let mut ids = Vec::new();
    for text in ["one", "two", "three"] {
        ids.push(store.info("ann", text)?.ok_or("stored")?);
    }
    let with_header = |value: &str| -> TestResult<HeaderMap> {
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", HeaderValue::from_str(value)?);
        Ok(headers)
    };
    runtime().block_on(async {
        // A malformed header is ignored: everything is sent.
        let response = LiveMessages::new(store.clone(), "ann")
            .last_event_id(&with_header("not-an-id")?)
            .into_response();
        let mut events = Events::of_response(response);
        assert_eq!(events.next_message(PATIENCE).await?.text, "one");
        drop(events); // not committed: all three are back

        let response = LiveMessages::new(store.clone(), "ann")
            .last_event_id(&with_header(&ids[1].to_string())?)
            .into_response();
        let mut events = Events::of_response(response);
        assert_eq!(events.next_message(PATIENCE).await?.text, "three");
        committed(&mut events).await?;
        assert!(
            store.get_messages("ann")?.is_empty(),
            "the ones the client had are committed too"
        );

        Ok(())
    })
}

fn last_event_id_covers_only_the_first_batch(engine: Engine) -> TestResult {
    let store = engine.open_fast()?;
    store.info("ann", "early")?;
    // Another page holds "early" while the client reconnects.
    let held = store.lease_messages("ann")?;
    let late = store.info("ann", "late")?.ok_or("stored")?;
    runtime().block_on(async {
        let response = LiveMessages::new(store.clone(), "ann")
            .received_up_to(late)
            .into_response();
        let mut events = Events::of_response(response);
        committed(&mut events).await?; // "late", not sent again
        // "early" comes back with a lower id; this client never had it.
        held.release();
        assert_eq!(events.next_message(PATIENCE).await?.text, "early");
        committed(&mut events).await?;
        assert_eq!(store.count("ann")?, 0);
        Ok(())
    })
}

fn a_late_commit_does_not_send_the_messages_again(engine: Engine) -> TestResult {
    let timeout = Duration::from_millis(1000);
    let store = engine.open_with(|builder| fast(builder).lease_timeout(timeout))?;
    store.info("ann", "Once")?;
    runtime().block_on(async {
        let mut events = live(&store, "ann");
        assert_eq!(events.next_message(PATIENCE).await?.text, "Once");
        // A slow client: the lease expires before the server asks for more.
        tokio::time::sleep(timeout + timeout / 2).await;
        // The commit fails, the message is back in the queue; the stream
        // leases it again and commits it without sending it.
        committed(&mut events).await?;
        assert_eq!(store.count("ann")?, 0);
        assert_eq!(events.try_next(QUIET).await?, None, "sent twice");
        Ok(())
    })
}

fn with_two_tabs_open_one_gets_the_message(engine: Engine) -> TestResult {
    let store = engine.open_fast()?;
    runtime().block_on(async {
        let (mut first, mut second) = (live(&store, "ann"), live(&store, "ann"));
        settled(&mut first).await?;
        settled(&mut second).await?;
        store.info("ann", "One tab")?;
        let first_won = tokio::select! {
            got = first.next_message(PATIENCE) => { assert_eq!(got?.text, "One tab"); true }
            got = second.next_message(PATIENCE) => { assert_eq!(got?.text, "One tab"); false }
        };
        let (winner, loser) = if first_won {
            (&mut first, &mut second)
        } else {
            (&mut second, &mut first)
        };
        committed(winner).await?;
        assert_eq!(loser.try_next(QUIET).await?, None, "both tabs got it");
        assert!(
            store.get_messages("ann")?.is_empty(),
            "a page load afterwards shows it again"
        );
        Ok(())
    })
}

fn when_the_tab_that_won_goes_away_another_tab_gets_it(engine: Engine) -> TestResult {
    let store = engine.open_fast()?;
    runtime().block_on(async {
        let (mut first, mut second) = (live(&store, "ann"), live(&store, "ann"));
        settled(&mut first).await?;
        settled(&mut second).await?;
        store.info("ann", "Still shown")?;
        let first_won = tokio::select! {
            got = first.next_message(PATIENCE) => { assert_eq!(got?.text, "Still shown"); true }
            got = second.next_message(PATIENCE) => { assert_eq!(got?.text, "Still shown"); false }
        };
        // The winning tab closes before the server took the event: its
        // lease goes back, and the release wakes the other tab.
        let mut loser = if first_won {
            drop(first);
            second
        } else {
            drop(second);
            first
        };
        assert_eq!(loser.next_message(PATIENCE).await?.text, "Still shown");
        committed(&mut loser).await?;
        assert!(store.get_messages("ann")?.is_empty());
        Ok(())
    })
}

engine_tests! {
    an_open_stream_gets_a_message_sent_to_its_user,
    messages_queued_before_the_stream_opened_come_first_in_order,
    a_stream_dropped_before_the_server_took_on_leaves_the_message_queued,
    a_reconnect_is_not_sent_what_the_client_already_has,
    last_event_id_covers_only_the_first_batch,
    a_late_commit_does_not_send_the_messages_again,
    with_two_tabs_open_one_gets_the_message,
    when_the_tab_that_won_goes_away_another_tab_gets_it,
}

#[test]
fn the_event_stream_request_is_not_a_page_navigation() {
    // What EventSource sends (Chromium adds the Sec-Fetch headers).
    let bare = RequestKind::new("GET").header("Accept", "text/event-stream");
    assert!(!bare.is_page_navigation());
    let chromium = bare
        .header("Sec-Fetch-Mode", "cors")
        .header("Sec-Fetch-Dest", "empty");
    assert!(!chromium.is_page_navigation());
    // The control: the page itself is one.
    let page = RequestKind::new("GET").header("Accept", "text/html,application/xhtml+xml");
    assert!(page.is_page_navigation());
}

/// A browser session: its own cookie jar; redirects are not followed.
fn browser() -> TestResult<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()?)
}

/// The demo over real HTTP, and sessions on it.
struct Site {
    base: String,
}

impl Site {
    async fn login(&self, user: &str) -> TestResult<reqwest::Client> {
        let client = browser()?;
        let response = client
            .post(format!("{}/login", self.base))
            .form(&[("user", user)])
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 303, "login as {user}");
        Ok(client)
    }

    async fn send(&self, from: &reqwest::Client, to: &str, text: &str) -> TestResult {
        let response = from
            .post(format!("{}/send", self.base))
            .form(&[("to", to), ("text", text), ("level", "warning")])
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 303, "send {text:?} to {to}");
        Ok(())
    }

    /// A page load (a navigation); the texts of the messages it shows.
    async fn page(&self, client: &reqwest::Client) -> TestResult<Vec<String>> {
        let response = client
            .get(format!("{}/", self.base))
            .header("accept", "text/html,application/xhtml+xml")
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 200);
        Ok(common::demo::shown(&response.text().await?))
    }

    /// `GET /events` as `EventSource` asks for it.
    async fn events(&self, client: &reqwest::Client) -> TestResult<Events> {
        let response = client
            .get(format!("{}/events", self.base))
            .header("accept", "text/event-stream")
            .header("cache-control", "no-cache")
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 200);
        let kind = response.headers().get("content-type").cloned();
        assert_eq!(kind, Some(HeaderValue::from_static("text/event-stream")));
        Ok(Events::of_http(response))
    }
}

/// Runs `test` against the demo served in `mode` (with its own store).
fn on_demo<F>(mode: DeliveryMode, test: impl FnOnce(Site, MessageStore) -> F) -> TestResult
where
    F: Future<Output = TestResult>,
{
    let served = common::web::serve("async-messages-live-", |store| {
        web_demo::app_with_mode(store, mode)
    })?;
    let site = Site {
        base: format!("http://{}", served.addr),
    };
    let result = runtime().block_on(test(site, served.store.clone()));
    drop(served);
    result
}

fn an_open_stream_gets_a_message_sent_from_another_session_once(mode: DeliveryMode) -> TestResult {
    on_demo(mode, |site, store| async move {
        let ann = site.login("ann").await?;
        let bob = site.login("bob").await?;
        let mut events = site.events(&ann).await?;
        let text = "Bob says <script>alert(1)</script> & hi";
        site.send(&bob, "ann", text).await?;
        let message = events.next_message(WITHIN).await?;
        assert_eq!(
            (message.level.as_str(), message.text.as_str()),
            ("warning", text)
        );
        assert_eq!(
            site.page(&ann).await?,
            Vec::<String>::new(),
            "the next page shows it again"
        );
        committed(&mut events).await?;
        assert_eq!(site.page(&ann).await?, Vec::<String>::new());
        assert_eq!(store.count("ann")?, 0);
        Ok(())
    })
}

#[test]
fn an_open_stream_gets_a_message_sent_from_another_session_once_at_most_once() -> TestResult {
    an_open_stream_gets_a_message_sent_from_another_session_once(DeliveryMode::AtMostOnce)
}

#[test]
fn an_open_stream_gets_a_message_sent_from_another_session_once_at_least_once() -> TestResult {
    an_open_stream_gets_a_message_sent_from_another_session_once(DeliveryMode::AtLeastOnce)
}

#[test]
fn a_message_sent_while_no_stream_is_open_waits_for_the_next_page() -> TestResult {
    on_demo(DeliveryMode::AtMostOnce, |site, _store| async move {
        let ann = site.login("ann").await?;
        let bob = site.login("bob").await?;
        site.send(&bob, "ann", "While you were away").await?;
        assert_eq!(site.page(&ann).await?, ["While you were away"]);
        // A stream opened afterwards does not get it again.
        let mut events = site.events(&ann).await?;
        site.send(&bob, "ann", "Live").await?;
        assert_eq!(events.next_message(WITHIN).await?.text, "Live");
        Ok(())
    })
}

#[test]
fn the_events_request_does_not_take_the_pages_messages() -> TestResult {
    on_demo(DeliveryMode::AtMostOnce, |site, store| async move {
        let ann = site.login("ann").await?;
        let bob = site.login("bob").await?;
        site.send(&bob, "ann", "Queued before the stream").await?;
        // Had the layer taken it for `/events` (at most once), it would be
        // lost: the stream would find nothing.
        let mut events = site.events(&ann).await?;
        let message = events.next_message(PATIENCE).await?;
        assert_eq!(message.text, "Queued before the stream");
        committed(&mut events).await?;
        assert_eq!(store.count("ann")?, 0);
        Ok(())
    })
}

#[test]
fn anonymous_events_are_refused_and_the_page_has_no_stream() -> TestResult {
    on_demo(DeliveryMode::AtMostOnce, |site, _store| async move {
        let anonymous = browser()?;
        let response = anonymous
            .get(format!("{}/events", site.base))
            .header("accept", "text/event-stream")
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 401);
        let page = anonymous.get(format!("{}/", site.base)).send().await?;
        assert!(!page.text().await?.contains("EventSource"));
        let ann = site.login("ann").await?;
        let page = ann.get(format!("{}/", site.base)).send().await?;
        let page = page.text().await?;
        assert!(page.contains("new EventSource(\"/events\")"), "{page}");
        assert!(!page.contains("innerHTML"), "{page}");
        Ok(())
    })
}
