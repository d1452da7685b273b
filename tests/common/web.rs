//! An axum app served over real HTTP for the web tests, and a reader of
//! server-sent events.

use std::collections::VecDeque;
use std::error::Error;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use async_messages::{Level, MessageStore};
use futures_util::{Stream, StreamExt};

/// An app on a free port of 127.0.0.1, with its own store in its own temp
/// dir.
pub struct Served {
    pub addr: SocketAddr,
    pub store: MessageStore,
    // Dropped in this order: the server stops, then the directory goes.
    runtime: tokio::runtime::Runtime,
    pub dir: tempfile::TempDir,
}

/// Serves `app(store)`, the store (at `Level::Debug`) in a temp dir named
/// `prefix…`, on a two-thread runtime.
pub fn serve(
    prefix: &str,
    app: impl FnOnce(MessageStore) -> axum::Router,
) -> Result<Served, Box<dyn Error>> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    let store = MessageStore::builder()
        .path(dir.path().join("store"))
        .min_level(Level::Debug)
        .open()?;
    let (addr, runtime) = serve_app(app(store.clone()))?;
    Ok(Served {
        addr,
        store,
        runtime,
        dir,
    })
}

/// Serves `app` on a free port of 127.0.0.1, on a two-thread runtime that
/// stops serving when dropped.
pub fn serve_app(
    app: axum::Router,
) -> Result<(SocketAddr, tokio::runtime::Runtime), Box<dyn Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    runtime.spawn(async move { axum::serve(listener, app).await });
    Ok((addr, runtime))
}

/// One server-sent event, as a browser's `EventSource` reads it: the last
/// `id` field (`Some("")` for an id reset) and the `data` lines joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub data: Option<String>,
}

/// What a [`LiveMessages`](async_messages::LiveMessages) event carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveMessage {
    /// The event's SSE id.
    pub event_id: String,
    /// From the JSON data.
    pub id: u64,
    pub level: String,
    pub text: String,
}

impl SseEvent {
    /// The message of an event with data; `None` for an id-only event.
    pub fn message(&self) -> Result<Option<LiveMessage>, Box<dyn Error>> {
        let Some(data) = &self.data else {
            return Ok(None);
        };
        let json: serde_json::Value = serde_json::from_str(data)?;
        let field = |name: &str| {
            json.get(name)
                .cloned()
                .ok_or_else(|| format!("no {name} in {data}"))
        };
        Ok(Some(LiveMessage {
            event_id: self.id.clone().ok_or("a message event without an id")?,
            id: field("id")?.as_u64().ok_or("id is not a number")?,
            level: field("level")?.as_str().ok_or("level")?.to_owned(),
            text: field("text")?.as_str().ok_or("text")?.to_owned(),
        }))
    }
}

type Chunks = Pin<Box<dyn Stream<Item = Result<Vec<u8>, String>> + Send>>;

/// The events of an SSE response body, read as they arrive. Keep-alive
/// comments are skipped.
pub struct Events {
    chunks: Chunks,
    unparsed: Vec<u8>,
    ready: VecDeque<SseEvent>,
}

impl Events {
    /// The events of a response made in process (no HTTP).
    pub fn of_response(response: axum::response::Response) -> Events {
        let chunks = response
            .into_body()
            .into_data_stream()
            .map(|chunk| chunk.map(|bytes| bytes.to_vec()).map_err(|e| e.to_string()));
        Events::new(Box::pin(chunks))
    }

    /// The events of a real HTTP response (dropping `Events` closes it).
    pub fn of_http(response: reqwest::Response) -> Events {
        let chunks = futures_util::stream::unfold(Some(response), |response| async move {
            let mut response = response?;
            match response.chunk().await {
                Ok(Some(bytes)) => Some((Ok(bytes.to_vec()), Some(response))),
                Ok(None) => None,
                Err(error) => Some((Err(error.to_string()), None)),
            }
        });
        Events::new(Box::pin(chunks))
    }

    fn new(chunks: Chunks) -> Events {
        Events {
            chunks,
            unparsed: Vec::new(),
            ready: VecDeque::new(),
        }
    }

    /// The next event; an error if none comes `within` this long, or if
    /// the stream ends.
    pub async fn next(&mut self, within: Duration) -> Result<SseEvent, Box<dyn Error>> {
        self.try_next(within)
            .await?
            .ok_or_else(|| format!("no event within {within:?}").into())
    }

    /// The next event, or `None` if none comes `within` this long; an
    /// error if the stream ends.
    pub async fn try_next(&mut self, within: Duration) -> Result<Option<SseEvent>, Box<dyn Error>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(Some(event));
            }
            let Ok(chunk) = tokio::time::timeout_at(deadline, self.chunks.next()).await else {
                return Ok(None);
            };
            let chunk = chunk.ok_or("the event stream ended")??;
            self.unparsed.extend_from_slice(&chunk);
            self.parse();
        }
    }

    /// The next event with a message (id resets are skipped).
    pub async fn next_message(&mut self, within: Duration) -> Result<LiveMessage, Box<dyn Error>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Some(message) = self.next(left).await?.message()? {
                return Ok(message);
            }
        }
    }

    /// Moves each complete event (ended by a blank line) to `ready`.
    fn parse(&mut self) {
        while let Some(end) = self.unparsed.windows(2).position(|pair| pair == b"\n\n") {
            let block: Vec<u8> = self.unparsed.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&block);
            let (mut id, mut data) = (None, None::<String>);
            for line in block.lines() {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => id = Some(value.to_owned()),
                    "data" => match &mut data {
                        Some(data) => {
                            data.push('\n');
                            data.push_str(value);
                        }
                        None => data = Some(value.to_owned()),
                    },
                    _ => {} // a comment (keep-alive), event, retry
                }
            }
            if id.is_some() || data.is_some() {
                self.ready.push_back(SseEvent { id, data });
            }
        }
    }
}
