//! tower/axum integration (feature `axum`): [`MessagesLayer`] runs the
//! [`RequestHook`] around every request and hands the delivered messages to
//! handlers through the [`Messages`] extractor.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::FromRequestParts;
use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode};
use tower::{Layer, Service};

use crate::{
    Delivery, DeliveryMode, DrainPolicy, Message, MessageStore, RequestHook, RequestKind, UserId,
};

type ResolveUser = dyn Fn(&Parts) -> Option<UserId> + Send + Sync;

/// A tower layer that delivers each user's queued messages to their next
/// page. Handlers read them with the [`Messages`] extractor.
///
/// The user is resolved by a closure over the request's parts: read a
/// session, an extension set by your auth layer, or a header. `None` means
/// anonymous: no messages, no error.
///
/// Store calls that may wait for the disk run on tokio's blocking pool
/// (`spawn_blocking`), never on the async executor; a request whose user
/// has nothing queued costs one in-memory lookup and no blocking call.
/// A store error is logged (`tracing::error!`) and the page gets no messages.
///
/// ```
/// use async_messages::{MessageStore, Messages, MessagesLayer, UserId};
/// use axum::{Router, routing::get};
///
/// async fn page(messages: Messages) -> String {
///     messages.iter().map(|m| format!("[{}] {}\n", m.level(), m.text())).collect()
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let store = MessageStore::open(dir.path())?;
/// let app: Router = Router::new().route("/", get(page)).layer(MessagesLayer::new(
///     store,
///     |parts: &http::request::Parts| {
///         let user = parts.headers.get("x-user")?.to_str().ok()?;
///         Some(UserId::from(user))
///     },
/// ));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MessagesLayer {
    hook: RequestHook,
    user: Arc<ResolveUser>,
    #[cfg(feature = "axum-messages")]
    into_flash: bool,
}

impl std::fmt::Debug for MessagesLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessagesLayer")
            .field("hook", &self.hook)
            .finish_non_exhaustive()
    }
}

impl MessagesLayer {
    /// A layer delivering `store`'s messages to the user `user` resolves,
    /// with the default [`DrainPolicy`] and [`DeliveryMode`].
    pub fn new<F>(store: MessageStore, user: F) -> Self
    where
        F: Fn(&Parts) -> Option<UserId> + Send + Sync + 'static,
    {
        MessagesLayer {
            hook: RequestHook::new(store),
            user: Arc::new(user),
            #[cfg(feature = "axum-messages")]
            into_flash: false,
        }
    }

    /// Which requests take messages. Default: [`DrainPolicy::PageNavigations`].
    #[must_use]
    pub fn policy(mut self, policy: DrainPolicy) -> Self {
        self.hook = self.hook.policy(policy);
        self
    }

    /// How messages are taken. Default: [`DeliveryMode::AtMostOnce`]. With
    /// [`DeliveryMode::AtLeastOnce`] they are removed only if the handler's
    /// response is a 2xx or 3xx. The removal happens when the handler
    /// returns its response, before the body reaches the client: a
    /// connection that drops while the body is sent still loses them.
    #[must_use]
    pub fn mode(mut self, mode: DeliveryMode) -> Self {
        self.hook = self.hook.mode(mode);
        self
    }

    /// Also pushes the delivered messages into axum-messages' flash (feature
    /// `axum-messages`) before the handler runs, so a page that already shows
    /// `axum_messages::Messages` shows ours among them, on this page. Needs
    /// axum-messages' `MessagesManagerLayer` outside this layer (added after
    /// it with `.layer(..)`); without it, this does nothing. Default: off.
    #[cfg(feature = "axum-messages")]
    #[must_use]
    pub fn into_flash(mut self) -> Self {
        self.into_flash = true;
        self
    }
}

impl<S> Layer<S> for MessagesLayer {
    type Service = MessagesService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MessagesService {
            inner,
            hook: self.hook.clone(),
            user: Arc::clone(&self.user),
            #[cfg(feature = "axum-messages")]
            into_flash: self.into_flash,
        }
    }
}

/// The service made by [`MessagesLayer`].
#[derive(Clone)]
pub struct MessagesService<S> {
    inner: S,
    hook: RequestHook,
    user: Arc<ResolveUser>,
    #[cfg(feature = "axum-messages")]
    into_flash: bool,
}

impl<S> std::fmt::Debug for MessagesService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessagesService")
            .field("hook", &self.hook)
            .finish_non_exhaustive()
    }
}

/// The headers the hook looks at, owned, to move onto a blocking thread.
struct OwnedKind {
    method: String,
    headers: Vec<(&'static str, String)>,
}

impl OwnedKind {
    fn new(parts: &Parts) -> OwnedKind {
        OwnedKind {
            method: parts.method.as_str().to_owned(),
            headers: header_values(&parts.headers),
        }
    }

    fn kind(&self) -> RequestKind<'_> {
        self.headers
            .iter()
            .fold(RequestKind::new(&self.method), |kind, (name, value)| {
                kind.header(name, value)
            })
    }
}

fn header_values(headers: &HeaderMap) -> Vec<(&'static str, String)> {
    [
        "accept",
        "sec-fetch-mode",
        "sec-fetch-dest",
        "x-requested-with",
    ]
    .into_iter()
    .filter_map(|name| {
        let value = headers.get(name)?.to_str().ok()?;
        Some((name, value.to_owned()))
    })
    .collect()
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for MessagesService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // `poll_ready` readied `self.inner`, not a clone of it: call the
        // ready one and keep the fresh clone for the next request (see
        // tower's guide on cloning services in `call`).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let hook = self.hook.clone();
        let (mut parts, body) = request.into_parts();
        let user = (self.user)(&parts);
        let owned = OwnedKind::new(&parts);
        #[cfg(feature = "axum-messages")]
        let flash = self
            .into_flash
            .then(|| parts.extensions.get::<axum_messages::Messages>().cloned())
            .flatten();

        Box::pin(async move {
            let delivery = if hook.may_deliver(user.as_ref(), &owned.kind()) {
                take(hook, user, owned).await
            } else {
                None
            };
            let messages = Messages {
                messages: delivery
                    .as_ref()
                    .map(|delivery| Arc::from(delivery.messages()))
                    .unwrap_or_else(|| Arc::from(Vec::new())),
            };
            #[cfg(feature = "axum-messages")]
            if let Some(flash) = flash
                && !messages.is_empty()
            {
                // Shares its state with the handler's extractor, which
                // shows pending messages when it is extracted.
                let _ = messages.push_into(flash);
            }
            parts.extensions.insert(messages);
            let response = inner.call(Request::from_parts(parts, body)).await;
            if let Some(delivery) = delivery {
                let status = response
                    .as_ref()
                    .map_or(500, |response| response.status().as_u16());
                finish(delivery, status).await;
            }
            response
        })
    }
}

/// Runs the hook on the blocking pool.
async fn take(hook: RequestHook, user: Option<UserId>, owned: OwnedKind) -> Option<Delivery> {
    let joined = tokio::task::spawn_blocking(move || hook.on_request(user, &owned.kind())).await;
    match joined {
        Ok(delivery) => Some(delivery),
        Err(error) => {
            tracing::error!(%error, "taking messages failed; the page is shown without them");
            None
        }
    }
}

/// Commits or releases a lease on the blocking pool (nothing to do for
/// messages already removed).
async fn finish(delivery: Delivery, status: u16) {
    if !delivery.is_leased() {
        return;
    }
    if let Err(error) = tokio::task::spawn_blocking(move || delivery.finish(status)).await {
        tracing::error!(%error, "finishing a message delivery failed; leased messages come back");
    }
}

/// The messages delivered to this request, in send order: an axum
/// extractor. Empty for anonymous users and requests that do not take
/// messages (see [`DrainPolicy`]).
///
/// Extracting it without [`MessagesLayer`] installed is a server error whose
/// body says so.
#[derive(Debug, Clone)]
pub struct Messages {
    messages: Arc<[Message]>,
}

impl Messages {
    /// The messages, in send order.
    pub fn iter(&self) -> std::slice::Iter<'_, Message> {
        self.messages.iter()
    }

    /// How many there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// `true` if there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Hands the messages to axum-messages' flash messages (feature
    /// `axum-messages`), mapping levels one to one. axum-messages shows
    /// pushed messages on the next request that reads them, and keeps them in
    /// the session until then.
    #[cfg(feature = "axum-messages")]
    pub fn push_into(&self, flash: axum_messages::Messages) -> axum_messages::Messages {
        self.iter().fold(flash, |flash, message| {
            flash.push(flash_level(message.level()), message.text(), None)
        })
    }
}

/// Our level as axum-messages' level (both follow Django's five levels).
#[cfg(feature = "axum-messages")]
fn flash_level(level: crate::Level) -> axum_messages::Level {
    match level {
        crate::Level::Debug => axum_messages::Level::Debug,
        crate::Level::Info => axum_messages::Level::Info,
        crate::Level::Success => axum_messages::Level::Success,
        crate::Level::Warning => axum_messages::Level::Warning,
        crate::Level::Error => axum_messages::Level::Error,
    }
}

#[cfg(all(test, feature = "axum-messages"))]
mod tests {
    #[test]
    fn levels_map_one_to_one_and_keep_their_order() {
        let mapped: Vec<_> = crate::Level::ALL
            .into_iter()
            .map(super::flash_level)
            .collect();
        assert_eq!(
            mapped,
            [
                axum_messages::Level::Debug,
                axum_messages::Level::Info,
                axum_messages::Level::Success,
                axum_messages::Level::Warning,
                axum_messages::Level::Error,
            ]
        );
        assert!(mapped.windows(2).all(|w| w[0] < w[1]));
    }
}

impl<'a> IntoIterator for &'a Messages {
    type Item = &'a Message;
    type IntoIter = std::slice::Iter<'a, Message>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Why [`Messages`] could not be extracted.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct MissingMessagesLayer;

impl std::fmt::Display for MissingMessagesLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Can't extract the delivered messages. Is `MessagesLayer` installed?")
    }
}

impl std::error::Error for MissingMessagesLayer {}

impl axum::response::IntoResponse for MissingMessagesLayer {
    fn into_response(self) -> axum::response::Response {
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Messages {
    type Rejection = MissingMessagesLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Messages>()
            .cloned()
            .ok_or(MissingMessagesLayer)
    }
}
