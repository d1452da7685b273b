//! The tower/axum layer, driven in-process (tests over real HTTP are in
//! `web_delivery.rs`).
#![cfg(feature = "axum")]

mod common;

use async_messages::{DeliveryMode, MessageStore, Messages, MessagesLayer, Result, UserId};
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use common::TestDir;

async fn page(messages: Messages) -> String {
    messages.iter().map(|m| format!("{};", m.text())).collect()
}

async fn failing(messages: Messages) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, page(messages).await)
}

fn app(store: &MessageStore, mode: DeliveryMode) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/fail", get(failing))
        .layer(
            MessagesLayer::new(store.clone(), |parts: &http::request::Parts| {
                Some(UserId::from(parts.headers.get("x-user")?.to_str().ok()?))
            })
            .mode(mode),
        )
}

async fn get_body(app: &Router, uri: &str, user: Option<&str>, xhr: bool) -> (StatusCode, String) {
    let mut request = Request::get(uri).header("accept", "text/html");
    if let Some(user) = user {
        request = request.header("x-user", user);
    }
    if xhr {
        request = request.header("x-requested-with", "XMLHttpRequest");
    }
    common::call(app, request.body(Body::empty()).expect("request")).await
}

#[tokio::test]
async fn the_next_page_shows_messages_once() -> Result<()> {
    let dir = TestDir::new();
    let store = dir.open()?;
    let app = app(&store, DeliveryMode::AtMostOnce);
    store.info("ann", "first")?;
    store.info("ann", "second")?;
    assert_eq!(get_body(&app, "/", None, false).await.1, "");
    assert_eq!(get_body(&app, "/", Some("bob"), false).await.1, "");
    assert_eq!(
        get_body(&app, "/", Some("ann"), true).await.1,
        "",
        "XHR does not consume"
    );
    assert_eq!(
        get_body(&app, "/", Some("ann"), false).await.1,
        "first;second;"
    );
    assert_eq!(get_body(&app, "/", Some("ann"), false).await.1, "");
    Ok(())
}

#[tokio::test]
async fn a_failing_handler_does_not_lose_leased_messages() -> Result<()> {
    let dir = TestDir::new();
    let store = dir.open()?;
    let app = app(&store, DeliveryMode::AtLeastOnce);
    store.warning("ann", "kept")?;
    assert_eq!(
        get_body(&app, "/fail", Some("ann"), false).await,
        (StatusCode::INTERNAL_SERVER_ERROR, "kept;".to_owned())
    );
    assert_eq!(store.count("ann")?, 1);
    assert_eq!(get_body(&app, "/", Some("ann"), false).await.1, "kept;");
    assert_eq!(store.count("ann")?, 0);
    Ok(())
}

#[tokio::test]
async fn extracting_without_the_layer_names_the_fix() {
    let app = Router::new().route("/", get(page));
    let (status, body) = get_body(&app, "/", Some("ann"), false).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body.contains("Is `MessagesLayer` installed?"), "{body}");
}
