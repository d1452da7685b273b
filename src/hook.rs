//! The framework-agnostic request hook: which requests get the user's
//! messages, and how they are taken.

use std::fmt;

use crate::{Lease, Message, MessageStore, UserId};

/// What the hook needs to know about a request: its method and a few
/// headers. Build it from any web framework's request.
///
/// ```
/// use async_messages::RequestKind;
/// let page = RequestKind::new("GET").header("Accept", "text/html,application/xhtml+xml");
/// assert!(page.is_page_navigation());
/// let xhr = page.header("X-Requested-With", "XMLHttpRequest");
/// assert!(!xhr.is_page_navigation());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestKind<'a> {
    method: &'a str,
    accept: Option<&'a str>,
    fetch_mode: Option<&'a str>,
    fetch_dest: Option<&'a str>,
    requested_with: Option<&'a str>,
}

impl<'a> RequestKind<'a> {
    /// A request with this HTTP method (`"GET"`, `"POST"`, …) and no headers yet.
    #[must_use]
    pub fn new(method: &'a str) -> Self {
        RequestKind {
            method,
            ..RequestKind::default()
        }
    }

    /// Records a request header; the hook reads `Accept`, `Sec-Fetch-Mode`,
    /// `Sec-Fetch-Dest` and `X-Requested-With` (names are case-insensitive)
    /// and ignores the rest, so passing every header is fine.
    #[must_use]
    pub fn header(mut self, name: &str, value: &'a str) -> Self {
        let slot = if name.eq_ignore_ascii_case("accept") {
            &mut self.accept
        } else if name.eq_ignore_ascii_case("sec-fetch-mode") {
            &mut self.fetch_mode
        } else if name.eq_ignore_ascii_case("sec-fetch-dest") {
            &mut self.fetch_dest
        } else if name.eq_ignore_ascii_case("x-requested-with") {
            &mut self.requested_with
        } else {
            return self;
        };
        *slot = Some(value);
        self
    }

    /// The request's method.
    #[must_use]
    pub fn method(&self) -> &'a str {
        self.method
    }

    /// `true` for a page the user navigates to: `GET` or `HEAD`, accepting
    /// `text/html` explicitly (or sending no `Accept` at all; `*/*` alone is
    /// what images and `fetch()` send), and not marked by the
    /// browser as a script request (`X-Requested-With`, `Sec-Fetch-Mode`
    /// other than `navigate`, `Sec-Fetch-Dest` other than `document`/`iframe`).
    /// XHR and `fetch()` calls, images, scripts, stylesheets and favicons are
    /// not page navigations.
    #[must_use]
    pub fn is_page_navigation(&self) -> bool {
        let method_ok =
            self.method.eq_ignore_ascii_case("GET") || self.method.eq_ignore_ascii_case("HEAD");
        let accepts_html = self
            .accept
            .is_none_or(|accept| accept.to_ascii_lowercase().contains("text/html"));
        let not_script = self.requested_with.is_none()
            && self
                .fetch_mode
                .is_none_or(|mode| mode.eq_ignore_ascii_case("navigate"))
            && self.fetch_dest.is_none_or(|dest| {
                dest.eq_ignore_ascii_case("document") || dest.eq_ignore_ascii_case("iframe")
            });
        method_ok && accepts_html && not_script
    }
}

/// Which requests take the user's messages.
#[derive(Clone, Copy, Default)]
#[non_exhaustive]
pub enum DrainPolicy {
    /// Only page navigations ([`RequestKind::is_page_navigation`]): an XHR,
    /// an image or a favicon request never consumes messages meant for the
    /// page. The default.
    #[default]
    PageNavigations,
    /// Every request of a known user.
    AllRequests,
    /// Your own rule.
    Custom(fn(&RequestKind<'_>) -> bool),
}

impl fmt::Debug for DrainPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DrainPolicy::PageNavigations => "PageNavigations",
            DrainPolicy::AllRequests => "AllRequests",
            DrainPolicy::Custom(_) => "Custom",
        })
    }
}

impl DrainPolicy {
    fn applies(&self, request: &RequestKind<'_>) -> bool {
        match self {
            DrainPolicy::PageNavigations => request.is_page_navigation(),
            DrainPolicy::AllRequests => true,
            DrainPolicy::Custom(rule) => rule(request),
        }
    }
}

/// How messages are taken from the store for a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryMode {
    /// The page gets each message at most once: messages are removed when
    /// the request takes them ([`MessageStore::get_messages`]), before the
    /// page renders, so they are never shown twice but are lost if the
    /// handler then fails (or the process dies before the response). The
    /// default. (The store's drain itself is exactly once: each message is
    /// returned by one `get_messages` call.)
    #[default]
    AtMostOnce,
    /// The page gets each message at least once: messages are leased
    /// ([`MessageStore::lease_messages`]) and removed only when the response
    /// succeeds (2xx or 3xx, via [`Delivery::finish`]); if the handler
    /// fails, or the process dies first, they come back on the next
    /// request. A message can then be shown twice (the page rendered, but
    /// the response was reported as a failure), but a failing handler does
    /// not lose it.
    AtLeastOnce,
}

/// Hands the right messages to each request. Call
/// [`on_request`](RequestHook::on_request) before the handler runs and
/// [`Delivery::finish`] with the response status after it.
///
/// It never fails and never panics: a store error is logged with
/// `tracing::error!` and the request gets no messages (they stay queued).
///
/// `on_request` and `finish` may wait for the disk (with
/// [`Durability::Immediate`](crate::Durability::Immediate)); in an async
/// server, call them from a blocking thread (e.g. `spawn_blocking`), as
/// `MessagesLayer` does.
///
/// ```
/// use async_messages::{MessageStore, RequestHook, RequestKind, UserId};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let store = MessageStore::open(dir.path())?;
/// let hook = RequestHook::new(store.clone());
/// store.info(42_u64, "Your report is ready")?;
///
/// let page = RequestKind::new("GET").header("accept", "text/html");
/// let xhr = RequestKind::new("GET").header("x-requested-with", "XMLHttpRequest");
/// assert!(hook.on_request(Some(UserId::from(42_u64)), &xhr).messages().is_empty());
/// assert!(hook.on_request(None, &page).messages().is_empty()); // anonymous
///
/// let delivery = hook.on_request(Some(UserId::from(42_u64)), &page);
/// assert_eq!(delivery.messages()[0].text(), "Your report is ready");
/// delivery.finish(200);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RequestHook {
    store: MessageStore,
    policy: DrainPolicy,
    mode: DeliveryMode,
}

impl RequestHook {
    /// A hook with the default policy ([`DrainPolicy::PageNavigations`]) and
    /// mode ([`DeliveryMode::AtMostOnce`]).
    #[must_use]
    pub fn new(store: MessageStore) -> Self {
        RequestHook {
            store,
            policy: DrainPolicy::default(),
            mode: DeliveryMode::default(),
        }
    }

    /// Which requests take messages. Default: [`DrainPolicy::PageNavigations`].
    #[must_use]
    pub fn policy(mut self, policy: DrainPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How messages are taken. Default: [`DeliveryMode::AtMostOnce`].
    #[must_use]
    pub fn mode(mut self, mode: DeliveryMode) -> Self {
        self.mode = mode;
        self
    }

    /// The store this hook reads.
    #[must_use]
    pub fn store(&self) -> &MessageStore {
        &self.store
    }

    /// `false` when [`on_request`](Self::on_request) would certainly deliver
    /// nothing: anonymous, excluded by the policy, or nothing queued.
    /// Answered from memory, never waits: an async server can call it on
    /// its executor and skip the blocking call for most requests. (On Redis
    /// the queue is across the network, so this only rules out anonymous and
    /// excluded requests; [`on_request`](Self::on_request) then costs one
    /// round trip.)
    #[must_use]
    pub fn may_deliver(&self, user: Option<&UserId>, request: &RequestKind<'_>) -> bool {
        user.is_some_and(|user| {
            self.policy.applies(request) && self.store.may_have_messages_without_waiting(user)
        })
    }

    /// The messages to show on this request: none for an anonymous request
    /// (`user` is `None`) or one the policy excludes; never an error.
    pub fn on_request(&self, user: Option<UserId>, request: &RequestKind<'_>) -> Delivery {
        let Some(user) = user else {
            return Delivery::empty();
        };
        if !self.policy.applies(request) {
            return Delivery::empty();
        }
        let taken = match self.mode {
            DeliveryMode::AtMostOnce => self.store.get_messages(&user).map(Delivery::removed),
            DeliveryMode::AtLeastOnce => self.store.lease_messages(&user).map(Delivery::leased),
        };
        taken.unwrap_or_else(|error| {
            tracing::error!(%error, %user, "could not take the user's messages; the page is shown without them");
            Delivery::empty()
        })
    }
}

/// The messages a request shows. With [`DeliveryMode::AtLeastOnce`] they
/// are leased: call [`finish`](Delivery::finish) with the response status.
/// Dropping an unfinished delivery puts leased messages back.
#[derive(Debug)]
#[must_use = "call .finish(status) after the response, or leased messages come back"]
pub struct Delivery {
    messages: Vec<Message>,
    lease: Option<Lease>,
}

impl Delivery {
    fn empty() -> Delivery {
        Delivery {
            messages: Vec::new(),
            lease: None,
        }
    }

    fn removed(messages: Vec<Message>) -> Delivery {
        Delivery {
            messages,
            lease: None,
        }
    }

    fn leased(lease: Lease) -> Delivery {
        Delivery {
            messages: lease.messages().to_vec(),
            lease: (!lease.messages().is_empty()).then_some(lease),
        }
    }

    /// The messages to show, in send order.
    #[must_use]
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// `true` if there is nothing to show.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// `true` if the messages are leased and wait for [`finish`](Self::finish).
    #[must_use]
    pub fn is_leased(&self) -> bool {
        self.lease.is_some()
    }

    /// Ends the delivery once the response status is known: leased messages
    /// are removed for a success (2xx) or redirect (3xx), and put back
    /// otherwise. Does nothing for messages that were removed already. A
    /// store error is logged and the messages stay queued.
    pub fn finish(self, status: u16) {
        let Some(lease) = self.lease else {
            return;
        };
        if (200..400).contains(&status) {
            if let Err(error) = lease.commit() {
                tracing::error!(%error, "could not remove shown messages; they will be shown again");
            }
        } else {
            lease.release();
        }
    }

    /// Takes the messages out, e.g. to hand them to a template.
    #[must_use]
    pub fn take_messages(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.messages)
    }
}
