//! Live delivery to open pages (feature `axum`): [`LiveMessages`] turns a
//! user's queue into a stream of server-sent events.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::fmt;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use http::HeaderMap;
use serde::Serialize;

use crate::{Error, Lease, Message, MessageId, MessageStore, UserId, Watch};

/// A user's messages as a stream of server-sent events, pushed to an open
/// page as they are sent: the response of an `EventSource` endpoint.
///
/// ```
/// use async_messages::{LiveMessages, MessageStore};
/// use axum::extract::State;
/// use axum::http::HeaderMap;
/// use axum::{Router, routing::get};
///
/// async fn events(State(store): State<MessageStore>, headers: HeaderMap) -> LiveMessages {
///     let user: u64 = 7; // the logged-in user, from your session
///     LiveMessages::new(store, user).last_event_id(&headers)
/// }
///
/// let app: Router = Router::new()
///     .route("/events", get(events))
///     .with_state(MessageStore::in_memory());
/// ```
///
/// and in the page, with the text kept as text (never as HTML):
///
/// ```js
/// const source = new EventSource("/events");
/// source.onmessage = (event) => {
///   const message = JSON.parse(event.data); // {"id": 12, "level": "success", "text": "…"}
///   const item = document.createElement("li");
///   item.className = "message message-" + message.level;
///   item.textContent = message.text;
///   document.querySelector("#messages").append(item);
/// };
/// // Leaving the page: let the next page have what arrives meanwhile.
/// document.addEventListener("submit", () => source.close());
/// window.addEventListener("pagehide", () => source.close());
/// ```
///
/// # What is sent
///
/// One event per message, in send order: the SSE `id` is the message id,
/// the `data` is JSON `{"id": …, "level": "info", "text": "…"}` (the level's
/// lower-case name, the text exactly as sent, not escaped: insert it with
/// `textContent`). After a batch is committed, an event with an empty `id`
/// and no data resets the browser's last event id. A keep-alive comment
/// goes out every 15 s by default ([`keep_alive`](Self::keep_alive)).
///
/// # Either the stream or a later page, never both, never lost
///
/// The stream makes a [`Watch`] first, then leases the user's queued
/// messages ([`MessageStore::lease_messages`], on tokio's blocking pool),
/// hands one event per message to the server, and commits the lease only
/// when the server asks for the next event, that is once it has taken
/// every event of the batch; then it waits for the next wake-up. So:
///
/// - a message committed by the stream was handed to this response; a
///   page load after that does not show it;
/// - if the client goes away first, the server drops the stream, the lease
///   is released and the messages go back to the queue, for the next page
///   load (or another open stream);
/// - a message sent while no stream is open waits in the queue as usual.
///
/// The commit means "the server took it", not "the browser showed it": a
/// connection that breaks after the server wrote an event can lose that
/// event on the way, as any response can.
///
/// **Reconnects.** `EventSource` reconnects by itself and sends the id of
/// the last event it got as `Last-Event-ID`; pass the request's headers to
/// [`last_event_id`](Self::last_event_id). Messages still queued with an id
/// up to that one were received by this client before the stream could
/// commit them: they are committed without being sent again. Because the
/// id is reset after every commit, the header is only sent when the client
/// may hold such messages.
///
/// **A late commit.** If the lease was held past the store's lease timeout
/// (a client too slow to take the events), the commit fails with
/// [`Error::LeaseExpired`] and the messages go back to the queue: this
/// stream then commits them without sending them again, but a page load in
/// between may show them too.
///
/// **Two tabs.** Each open page has its own stream, and a send wakes them
/// all; the first to lease the message gets it, the others find nothing to
/// send. So exactly one tab shows it (which one is a race), and a page
/// loaded afterwards shows nothing. If the winning tab's connection closes
/// before the server took the event, the message goes back to the queue and
/// wakes the other tabs, one of which shows it.
///
/// **Page loads.** [`MessagesLayer`](crate::MessagesLayer) does not take
/// messages for the `EventSource` request itself: it sends
/// `Accept: text/event-stream`, so it is not a page navigation
/// ([`RequestKind::is_page_navigation`](crate::RequestKind::is_page_navigation)).
/// Close the `EventSource` when the page is left (on a form's `submit`
/// and on `pagehide`, as the demo does): while the next page loads, the
/// old page's stream is still open and would take a message sent by the
/// very request that leaves it (a form sending to oneself), showing it on a
/// page about to go away instead of the next one.
///
/// **Errors.** A store error (a failed lease or commit, Redis down) is
/// logged (`tracing::error!`) and ends the stream; `EventSource` reconnects
/// by itself a few seconds later, and `Last-Event-ID` keeps it from getting
/// a message twice. The stream needs a tokio runtime (axum's).
#[must_use = "a LiveMessages does nothing until returned as a response"]
pub struct LiveMessages {
    store: MessageStore,
    user: UserId,
    last_event_id: Option<u64>,
    keep_alive: KeepAlive,
}

impl fmt::Debug for LiveMessages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveMessages")
            .field("user", &self.user)
            .field("last_event_id", &self.last_event_id)
            .finish_non_exhaustive()
    }
}

impl LiveMessages {
    /// The live messages of `user` in `store`.
    pub fn new(store: MessageStore, user: impl Into<UserId>) -> Self {
        LiveMessages {
            store,
            user: user.into(),
            last_event_id: None,
            keep_alive: KeepAlive::default(),
        }
    }

    /// Reads the `Last-Event-ID` header that `EventSource` sends when it
    /// reconnects (see "Reconnects" above). A missing or malformed header
    /// (not a message id) is ignored. Default: none.
    pub fn last_event_id(mut self, headers: &HeaderMap) -> Self {
        self.last_event_id = headers
            .get("last-event-id")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse().ok());
        self
    }

    /// The client says it already received the messages up to `id` (what
    /// [`last_event_id`](Self::last_event_id) reads from the header).
    /// Default: none.
    pub fn received_up_to(mut self, id: MessageId) -> Self {
        self.last_event_id = Some(id.get());
        self
    }

    /// How often an idle stream sends a keep-alive comment. Default:
    /// [`KeepAlive::default`] (an empty comment every 15 s).
    pub fn keep_alive(mut self, keep_alive: KeepAlive) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    /// The events without the keep-alive, for tests or your own response.
    /// The stream never ends on its own, except after a store error (logged).
    pub fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
        let live = Live {
            store: self.store,
            user: self.user,
            received_up_to: self.last_event_id,
            watch: None,
            wait: false,
            batch: None,
            to_send: VecDeque::new(),
            unconfirmed: HashSet::new(),
        };
        futures_util::stream::unfold(live, |mut live| async move {
            let event = live.next_event().await?;
            Some((Ok(event), live))
        })
    }
}

impl IntoResponse for LiveMessages {
    fn into_response(self) -> Response {
        let keep_alive = self.keep_alive.clone();
        Sse::new(self.into_stream())
            .keep_alive(keep_alive)
            .into_response()
    }
}

/// The JSON of one event.
#[derive(Serialize)]
struct EventData<'a> {
    id: u64,
    level: &'static str,
    text: &'a str,
}

/// One lease whose events are being handed to the server.
struct Batch {
    lease: Lease,
    /// Every message of the lease, sent or skipped.
    ids: Vec<MessageId>,
}

/// The stream's state between events.
struct Live {
    store: MessageStore,
    user: UserId,
    /// `Last-Event-ID`: applies to the first lease only (a message with a
    /// lower id that shows up later, e.g. released by another tab, was not
    /// received).
    received_up_to: Option<u64>,
    /// Made before the first lease.
    watch: Option<Watch>,
    /// The last lease found nothing: wait for a wake-up before the next.
    wait: bool,
    batch: Option<Batch>,
    to_send: VecDeque<Event>,
    /// Sent (or received, per `Last-Event-ID`) on this stream, but not
    /// committed (the commit came too late): never sent again here.
    unconfirmed: HashSet<MessageId>,
}

impl Live {
    /// The next event; `None` ends the stream (after a logged error).
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.to_send.pop_front() {
                return Some(event);
            }
            // Asked for more: the server took every event of the batch.
            if let Some(batch) = self.batch.take() {
                let Batch { lease, ids } = batch;
                match blocking(move || lease.commit()).await? {
                    Ok(_) => {
                        for id in &ids {
                            self.unconfirmed.remove(id);
                        }
                        if !ids.is_empty() {
                            // Nothing uncommitted left on the client: it
                            // need not send Last-Event-ID on a reconnect.
                            return Some(Event::default().id(""));
                        }
                        self.wait = true;
                    }
                    Err(Error::LeaseExpired { timeout }) => {
                        tracing::warn!(
                            ?timeout,
                            "live messages: the lease expired before its commit; \
                             its messages are back in the queue and not sent again on this stream"
                        );
                        self.unconfirmed.extend(ids);
                    }
                    Err(error) => {
                        tracing::error!(%error, "live messages: the commit failed; the stream ends");
                        return None;
                    }
                }
                continue;
            }
            match &mut self.watch {
                None => {
                    // Before the first lease, so that no send is missed.
                    let (store, user) = (self.store.clone(), self.user.clone());
                    match blocking(move || store.watch(user)).await? {
                        Ok(watch) => self.watch = Some(watch),
                        Err(error) => {
                            tracing::error!(%error, "live messages: cannot watch the queue; the stream ends");
                            return None;
                        }
                    }
                }
                Some(watch) if self.wait => watch.changed().await,
                Some(_) => {}
            }
            self.wait = false;
            let (store, user) = (self.store.clone(), self.user.clone());
            let lease = match blocking(move || store.lease_messages(user)).await? {
                Ok(lease) => lease,
                Err(error) => {
                    tracing::error!(%error, "live messages: leasing failed; the stream ends");
                    return None;
                }
            };
            self.start_batch(lease);
        }
    }

    /// Queues the events of `lease` (even an empty one is committed: it may
    /// hold expired or replaced messages, which its commit removes).
    fn start_batch(&mut self, lease: Lease) {
        let received_up_to = self.received_up_to.take();
        let mut ids = Vec::with_capacity(lease.messages().len());
        for message in lease.messages() {
            ids.push(message.id());
            let received = received_up_to.is_some_and(|up_to| message.id().get() <= up_to);
            if received {
                self.unconfirmed.insert(message.id());
            } else if !self.unconfirmed.contains(&message.id()) {
                self.to_send.push_back(event(message));
            }
        }
        self.batch = Some(Batch { lease, ids });
    }
}

fn event(message: &Message) -> Event {
    let data = EventData {
        id: message.id().get(),
        level: message.level().as_str(),
        text: message.text(),
    };
    let event = Event::default().id(message.id().to_string());
    match event.json_data(&data) {
        Ok(event) => event,
        // Unreachable (a number and two strings always serialize), but no
        // panic: the text alone is still text.
        Err(_) => Event::default()
            .id(message.id().to_string())
            .data(message.text()),
    }
}

/// Runs `work` on tokio's blocking pool; `None` if it panicked or the
/// runtime is shutting down (logged). A lease the task returns after its
/// caller is gone is dropped there, which puts its messages back.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => Some(value),
        Err(error) => {
            tracing::error!(%error, "live messages: a store call did not finish; the stream ends");
            None
        }
    }
}
