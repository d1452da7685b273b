//! An axum app served over real HTTP for the web tests.

use std::error::Error;
use std::net::SocketAddr;

use async_messages::{Level, MessageStore};

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
