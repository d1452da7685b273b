//! A web app to click through: log in, send messages to users, start a
//! "report" that finishes a second later, and see each message once: on the
//! next page, or at once on a page that is open (`GET /events`, server-sent
//! events through [`LiveMessages`]).
//!
//! ```text
//! cargo run --example web_demo --features axum
//! # then open http://127.0.0.1:3000 (ASYNC_MESSAGES_ADDR to change it)
//!
//! # Two demos sharing one Redis server: a message sent through one is shown
//! # once, by whichever the recipient loads a page from.
//! ASYNC_MESSAGES_REDIS=redis://127.0.0.1:6379 ASYNC_MESSAGES_ADDR=127.0.0.1:3000 \
//!     cargo run --example web_demo --features axum,redis
//! ASYNC_MESSAGES_REDIS=redis://127.0.0.1:6379 ASYNC_MESSAGES_ADDR=127.0.0.1:3001 \
//!     cargo run --example web_demo --features axum,redis
//! ```
//!
//! Environment: `ASYNC_MESSAGES_ADDR` (default `127.0.0.1:3000`),
//! `ASYNC_MESSAGES_PATH` (the store's directory; default a directory in the
//! system's temp dir), `ASYNC_MESSAGES_MODE`: `at-most-once` (the default: the
//! messages taken by the failing page `/broken` are lost) or `at-least-once`
//! (leased delivery: they come back on the next page).
//! `ASYNC_MESSAGES_REDIS` (a `redis://` URL): keep the messages on that Redis
//! server instead of in `ASYNC_MESSAGES_PATH` (needs the `redis` feature),
//! under the key prefix `ASYNC_MESSAGES_NAMESPACE` (default
//! `async-messages`).
//!
//! Sessions are a demo: an in-memory map from a random cookie value to a user
//! name, forgotten on restart (the queued messages are not). Use a real
//! session store (e.g. tower-sessions) in an application.
//!
//! The tests (`tests/web_delivery.rs`, `tests/browser.rs`) include this file
//! to drive the same app over HTTP; `tests/several_servers.rs` runs `main`
//! in two processes on one Redis server.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_messages::{
    DeliveryMode, Level, LiveMessages, Message, MessageStore, Messages, MessagesLayer, UserId,
};
use axum::Router;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode, header, request::Parts};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;

/// The session cookie's name.
const COOKIE: &str = "session";

/// Logged-in sessions: cookie value → user name. In memory, for the demo.
#[derive(Clone, Default)]
struct Sessions(Arc<Mutex<HashMap<String, String>>>);

impl Sessions {
    fn user(&self, headers: &HeaderMap) -> Option<String> {
        let id = session_cookie(headers)?;
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(id).cloned()
    }

    fn start(&self, user: String) -> String {
        let id = new_session_id();
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert(id.clone(), user);
        id
    }

    fn end(&self, headers: &HeaderMap) {
        if let Some(id) = session_cookie(headers) {
            let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            map.remove(id);
        }
    }
}

/// The value of the `session` cookie, if the request has one.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// 128 unpredictable bits from std's randomly keyed hasher: good enough for
/// a demo's session ids, not a substitute for a real session store.
fn new_session_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let high = RandomState::new().hash_one((count, now));
    let low = RandomState::new().hash_one((now, count));
    format!("{high:016x}{low:016x}")
}

#[derive(Clone)]
struct AppState {
    store: MessageStore,
    sessions: Sessions,
}

/// The demo app with the library's default delivery mode
/// ([`DeliveryMode::AtMostOnce`]).
pub fn app(store: MessageStore) -> Router {
    app_with_mode(store, DeliveryMode::AtMostOnce)
}

/// The demo app, delivering messages in `mode`.
pub fn app_with_mode(store: MessageStore, mode: DeliveryMode) -> Router {
    let sessions = Sessions::default();
    let resolver_sessions = sessions.clone();
    // The layer asks this closure who the request's user is.
    let layer = MessagesLayer::new(store.clone(), move |parts: &Parts| {
        resolver_sessions.user(&parts.headers).map(UserId::from)
    })
    .mode(mode);
    Router::new()
        .route("/", get(index))
        .route("/broken", get(broken))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/send", post(send))
        .route("/report", post(report))
        .route("/events", get(events))
        .layer(layer)
        .with_state(AppState { store, sessions })
}

async fn index(
    State(state): State<AppState>,
    headers: HeaderMap,
    messages: Messages,
) -> Html<String> {
    let user = state.sessions.user(&headers);
    let shown: Vec<&Message> = messages.iter().collect();
    Html(page(user.as_deref(), &shown))
}

/// The logged-in user's messages as server-sent events, for the page's
/// `EventSource`; 401 for an anonymous request. The layer does not take
/// messages for this request (`Accept: text/event-stream` is not a page
/// navigation): the stream leases them itself, and a message it hands to
/// the server is not shown again by the next page.
async fn events(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match state.sessions.user(&headers) {
        Some(user) => LiveMessages::new(state.store.clone(), user)
            .last_event_id(&headers)
            .into_response(),
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

/// A page that fails after taking the messages. With
/// `DeliveryMode::AtLeastOnce` they are shown again on the next page; with
/// `AtMostOnce` (the default) they are lost.
async fn broken(messages: Messages) -> Response {
    let body = format!(
        "<!doctype html><title>Error</title><p>This page failed to render; \
         {} message(s) were taken for it. <a href=\"/\">Back</a></p>",
        messages.len()
    );
    (StatusCode::INTERNAL_SERVER_ERROR, Html(body)).into_response()
}

#[derive(Deserialize)]
struct Login {
    user: String,
}

async fn login(State(state): State<AppState>, Form(form): Form<Login>) -> Response {
    let user = form.user.trim();
    if user.is_empty() || user.len() > UserId::MAX_STR_BYTES {
        return bad_request("Enter a user name (up to 1 KiB).");
    }
    let id = state.sessions.start(user.to_owned());
    let cookie = format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Lax");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    state.sessions.end(&headers);
    let cookie = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

#[derive(Deserialize)]
struct Send {
    to: String,
    text: String,
    level: String,
}

async fn send(State(state): State<AppState>, Form(form): Form<Send>) -> Response {
    let Ok(level) = form.level.parse::<Level>() else {
        return bad_request("Choose a level: debug, info, success, warning or error.");
    };
    let users: Vec<String> = form
        .to
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect();
    if users.is_empty() {
        return bad_request("Name at least one recipient.");
    }
    // The store waits for the disk: keep it off the async executor.
    let store = state.store.clone();
    let sent =
        tokio::task::spawn_blocking(move || store.message_users(users, form.text, level)).await;
    match sent {
        Ok(Ok(_)) => Redirect::to("/").into_response(),
        Ok(Err(error)) => bad_request(&format!("The message was not sent: {error}")),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn report(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(user) = state.sessions.user(&headers) {
        // The "report" is built in the background; the user keeps browsing
        // and sees the message on the first page loaded after it is done.
        let store = state.store.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            if let Err(error) = store.success(user, "Your report is ready") {
                eprintln!("could not tell the user that the report is ready: {error}");
            }
        });
    }
    Redirect::to("/").into_response()
}

fn bad_request(reason: &str) -> Response {
    let body = format!(
        "<!doctype html><title>Bad request</title><p>{}</p><p><a href=\"/\">Back</a></p>",
        escape(reason)
    );
    (StatusCode::BAD_REQUEST, Html(body)).into_response()
}

/// Escapes text for HTML element content and quoted attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Shows live messages as they arrive, as text (`textContent` and text
/// nodes, never `innerHTML`, so a message's markup stays visible text).
const LIVE_SCRIPT: &str = r#"<script>
const source = new EventSource("/events");
source.onmessage = (event) => {
  const message = JSON.parse(event.data);
  const item = document.createElement("li");
  item.className = "message message-" + message.level + " live";
  item.id = "message-" + message.id;
  const level = document.createElement("span");
  level.className = "level";
  level.textContent = message.level;
  item.append(level, document.createTextNode(message.text));
  document.getElementById("messages").append(item);
  const none = document.getElementById("no-messages");
  if (none) none.remove();
};
// Leaving the page: stop taking messages, so that one sent meanwhile (by
// the form being submitted, say) is shown by the next page, not this one.
const stop = () => source.close();
document.addEventListener("submit", stop);
window.addEventListener("pagehide", stop);
</script>
"#;

const STYLE: &str = "
body { font-family: system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; padding: 0 1rem; }
ul.messages { list-style: none; padding: 0; }
.message { padding: .6rem 1rem; margin: .4rem 0; border-radius: .3rem; border-left: .4rem solid; }
.message-debug { background: #eeeeee; border-color: #888888; }
.message-info { background: #e3f0fc; border-color: #2f80d0; }
.message-success { background: #e5f6e8; border-color: #2e9a45; }
.message-warning { background: #fff4d6; border-color: #d9a400; }
.message-error { background: #fbe4e4; border-color: #c93030; }
.level { font-weight: bold; text-transform: uppercase; font-size: .75rem; margin-right: .5rem; }
form { margin: 1rem 0; }
label { display: block; margin: .3rem 0; }
";

fn page(user: Option<&str>, messages: &[&Message]) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>async-messages demo</title><style>{STYLE}</style></head><body>\n\
         <h1>async-messages demo</h1>\n"
    );
    if messages.is_empty() {
        html.push_str("<p id=\"no-messages\">No new messages.</p>\n");
    }
    // Always there when logged in: live messages are added to it.
    if !messages.is_empty() || user.is_some() {
        html.push_str("<ul class=\"messages\" id=\"messages\">\n");
        for message in messages {
            let level = message.level().as_str();
            let _ = writeln!(
                html,
                "<li class=\"message message-{level}\"><span class=\"level\">{level}</span>{}</li>",
                escape(message.text())
            );
        }
        html.push_str("</ul>\n");
    }
    match user {
        Some(user) => {
            let _ = write!(
                html,
                "<p id=\"whoami\">Logged in as <b>{}</b>.</p>\n\
                 <form method=\"post\" action=\"/logout\"><button id=\"logout\">Log out</button></form>\n\
                 <form method=\"post\" action=\"/report\"><button id=\"report\">Build my report</button> \
                 (a background job tells you when it is ready, on this page)</form>\n",
                escape(user)
            );
            html.push_str(LIVE_SCRIPT);
        }
        None => html.push_str(
            "<form method=\"post\" action=\"/login\"><label>User name \
             <input name=\"user\" id=\"user\" required></label>\
             <button id=\"login\">Log in</button></form>\n",
        ),
    }
    let to = user.map(escape).unwrap_or_default();
    let _ = write!(
        html,
        "<h2>Send a message</h2>\n\
         <form method=\"post\" action=\"/send\">\
         <label>To (comma-separated user names) <input name=\"to\" id=\"to\" value=\"{to}\" required></label>\
         <label>Text <input name=\"text\" id=\"text\" size=\"50\" required></label>\
         <label>Level <select name=\"level\" id=\"level\">"
    );
    for level in Level::ALL {
        let selected = if level == Level::Info {
            " selected"
        } else {
            ""
        };
        let _ = write!(html, "<option value=\"{level}\"{selected}>{level}</option>");
    }
    html.push_str(
        "</select></label><button id=\"send\">Send</button></form>\n\
         <p><a href=\"/\">Reload</a> · <a href=\"/broken\">a page that fails</a></p>\n\
         </body></html>\n",
    );
    html
}

/// Where the demo keeps its messages, from the environment.
enum Backend {
    /// `ASYNC_MESSAGES_PATH`, or a directory in the system's temp dir.
    Sled(std::path::PathBuf),
    /// `ASYNC_MESSAGES_REDIS` and `ASYNC_MESSAGES_NAMESPACE`.
    Redis { url: String, namespace: String },
}

impl Backend {
    fn from_env() -> Result<Backend, Box<dyn std::error::Error>> {
        match std::env::var("ASYNC_MESSAGES_REDIS") {
            Ok(url) => {
                if !cfg!(feature = "redis") {
                    return Err(
                        "ASYNC_MESSAGES_REDIS is set, but this build of the demo has no \
                                Redis support: run it with `--features axum,redis`"
                            .into(),
                    );
                }
                let namespace = std::env::var("ASYNC_MESSAGES_NAMESPACE")
                    .unwrap_or_else(|_| MessageStore::DEFAULT_NAMESPACE.to_owned());
                Ok(Backend::Redis { url, namespace })
            }
            Err(std::env::VarError::NotPresent) => Ok(Backend::Sled(
                std::env::var_os("ASYNC_MESSAGES_PATH").map_or_else(
                    || std::env::temp_dir().join("async-messages-web-demo"),
                    Into::into,
                ),
            )),
            Err(error) => Err(format!("ASYNC_MESSAGES_REDIS: {error}").into()),
        }
    }

    /// Opens the store (it may wait for the disk or the network).
    fn open(&self) -> async_messages::Result<MessageStore> {
        // The demo offers the debug level too, so store it.
        let builder = MessageStore::builder().min_level(Level::Debug);
        match self {
            Backend::Sled(path) => builder.path(path).open(),
            Backend::Redis { url, namespace } => builder.redis(url).namespace(namespace).open(),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Sled(path) => write!(f, "store in {}", path.display()),
            Backend::Redis { url, namespace } => {
                // Not the password, if the URL has one.
                let shown = match (url.split_once("://"), url.rsplit_once('@')) {
                    (Some((scheme, _)), Some((_, host))) => format!("{scheme}://***@{host}"),
                    _ => url.clone(),
                };
                write!(f, "messages on Redis at {shown}, namespace {namespace}")
            }
        }
    }
}

/// The demo server: reads its settings from the environment (see the top of
/// this file), serves until killed.
#[allow(dead_code)] // The tests include this file as a module; only some call `main`.
#[tokio::main]
pub async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("ASYNC_MESSAGES_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let mode = match std::env::var("ASYNC_MESSAGES_MODE").as_deref() {
        Err(std::env::VarError::NotPresent) | Ok("at-most-once") => DeliveryMode::AtMostOnce,
        Ok("at-least-once") => DeliveryMode::AtLeastOnce,
        other => {
            return Err(format!(
                "ASYNC_MESSAGES_MODE must be at-most-once (the default) or at-least-once, not {other:?}"
            )
            .into());
        }
    };
    let backend = Backend::from_env()?;
    let (store, backend) = tokio::task::spawn_blocking(move || {
        let store = backend.open();
        (store, backend)
    })
    .await?;
    let store = store?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "async-messages demo on http://{}, {backend}",
        listener.local_addr()?
    );
    axum::serve(listener, app_with_mode(store, mode)).await?;
    Ok(())
}
