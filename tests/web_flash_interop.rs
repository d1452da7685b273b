//! Interop with axum-messages (feature `axum-messages`): messages our layer
//! delivers, pushed into axum-messages' flash, come out of its extractor
//! with the same text and level, and leave our store: on the next request
//! when a handler pushes them, on this page with `MessagesLayer::into_flash`.
#![cfg(feature = "axum-messages")]

mod common;

use std::sync::Arc;

use async_messages::{Messages, MessagesLayer, Result, UserId};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use axum::{Extension, Router};
use common::TestDir;
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::{Session, SessionStore, session_store};

/// A session store the test never reaches: the session below has no id, so
/// its record lives in memory and nothing is loaded or saved.
#[derive(Debug)]
struct NoStore;

#[async_trait::async_trait]
impl SessionStore for NoStore {
    async fn save(&self, _: &Record) -> session_store::Result<()> {
        Err(session_store::Error::Backend("not expected".into()))
    }
    async fn load(&self, _: &Id) -> session_store::Result<Option<Record>> {
        Err(session_store::Error::Backend("not expected".into()))
    }
    async fn delete(&self, _: &Id) -> session_store::Result<()> {
        Err(session_store::Error::Backend("not expected".into()))
    }
}

async fn page(ours: Messages, flash: axum_messages::Messages) -> &'static str {
    let _ = ours.push_into(flash);
    "pushed"
}

async fn show_flash(flash: axum_messages::Messages) -> String {
    flash
        .map(|m| format!("{:?}:{};", m.level, m.message))
        .collect()
}

async fn get_body(app: &Router, uri: &str) -> (StatusCode, String) {
    let request = Request::get(uri)
        .header("accept", "text/html")
        .header("x-user", "ann")
        .body(Body::empty())
        .expect("request");
    common::call(app, request).await
}

#[tokio::test]
async fn delivered_messages_reach_axum_messages_flash_with_their_levels() -> Result<()> {
    let dir = TestDir::new();
    let store = dir.open()?;
    store.info("ann", "report ready")?;
    store.error("ann", "export failed")?;
    store.success("ann", "saved")?;

    // One session shared by both requests, as a cookie would.
    let session = Session::new(None, Arc::new(NoStore), None);
    let app = Router::new()
        .route("/", get(page))
        .route("/flash", get(show_flash))
        .layer(MessagesLayer::new(
            store.clone(),
            |parts: &http::request::Parts| {
                Some(UserId::from(parts.headers.get("x-user")?.to_str().ok()?))
            },
        ))
        .layer(axum_messages::MessagesManagerLayer)
        .layer(Extension(session));

    assert_eq!(get_body(&app, "/").await, (StatusCode::OK, "pushed".into()));
    assert_eq!(store.count("ann")?, 0, "our store handed them over");
    assert_eq!(
        get_body(&app, "/flash").await,
        (
            StatusCode::OK,
            "Info:report ready;Error:export failed;Success:saved;".into()
        )
    );
    // axum-messages shows them once too.
    assert_eq!(
        get_body(&app, "/flash").await,
        (StatusCode::OK, String::new())
    );
    Ok(())
}

#[tokio::test]
async fn into_flash_shows_delivered_messages_in_the_flash_of_this_page() -> Result<()> {
    let dir = TestDir::new();
    let store = dir.open()?;
    store.warning("ann", "disk almost full")?;
    store.info("ann", "report ready")?;

    let session = Session::new(None, Arc::new(NoStore), None);
    let app = Router::new()
        .route("/flash", get(show_flash))
        .layer(
            MessagesLayer::new(store.clone(), |parts: &http::request::Parts| {
                Some(UserId::from(parts.headers.get("x-user")?.to_str().ok()?))
            })
            .into_flash(),
        )
        .layer(axum_messages::MessagesManagerLayer)
        .layer(Extension(session));

    assert_eq!(
        get_body(&app, "/flash").await,
        (
            StatusCode::OK,
            "Warning:disk almost full;Info:report ready;".into()
        )
    );
    assert_eq!(store.count("ann")?, 0);
    assert_eq!(
        get_body(&app, "/flash").await,
        (StatusCode::OK, String::new())
    );
    Ok(())
}
