//! The request hook without a web framework: `examples/std_net_server.rs`
//! (plain `std::net`) served on 127.0.0.1 and driven over HTTP with reqwest.

#[allow(dead_code)] // `main` is not called.
#[path = "../examples/std_net_server.rs"]
mod std_net_server;

use std::error::Error;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use async_messages::{DeliveryMode, MessageStore, RequestHook};
use reqwest::blocking::{Client, Response};

type TestResult = Result<(), Box<dyn Error>>;

/// The example server on a free port, with its own store.
fn start() -> Result<(SocketAddr, MessageStore, tempfile::TempDir), Box<dyn Error>> {
    let dir = tempfile::Builder::new()
        .prefix("async-messages-std-net-")
        .tempdir()?;
    let store = MessageStore::open(dir.path().join("store"))?;
    let hook = RequestHook::new(store.clone()).mode(DeliveryMode::AtLeastOnce);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    // Serves until the test process exits.
    std::thread::spawn(move || std_net_server::serve(&listener, &hook));
    Ok((addr, store, dir))
}

/// A browser: its own cookie jar, redirects not followed (the tests look at
/// them), a generous timeout for a busy machine.
fn browser() -> reqwest::Result<Client> {
    Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
}

/// A page load of `url`, as a browser's navigation sends it.
fn navigate(client: &Client, url: &str) -> reqwest::Result<Response> {
    client
        .get(url)
        .header("Accept", "text/html,application/xhtml+xml,*/*;q=0.8")
        .header("Sec-Fetch-Mode", "navigate")
        .header("Sec-Fetch-Dest", "document")
        .send()
}

#[test]
fn the_hook_delivers_once_to_the_next_page() -> TestResult {
    let (addr, store, _dir) = start()?;
    let base = format!("http://{addr}");
    store.success("ann", "Report <ready> & waiting")?;

    let anonymous = browser()?;
    let page = navigate(&anonymous, &format!("{base}/"))?;
    assert_eq!(page.status().as_u16(), 200);
    let body = page.text()?;
    assert!(body.contains("Anonymous"), "{body}");
    assert!(!body.contains("Report"), "{body}");

    // An XHR from Ann's page does not take it. reqwest sends `Accept: */*`
    // unless told otherwise, and `*/*` alone already marks a script request:
    // jQuery's `text/html, */*` keeps `X-Requested-With` the only reason.
    let ann = browser()?;
    let xhr = ann
        .get(format!("{base}/?user=ann"))
        .header("Accept", "text/html, */*; q=0.01")
        .header("X-Requested-With", "XMLHttpRequest")
        .send()?;
    let body = xhr.text()?;
    assert!(!body.contains("Report"), "{body}");
    assert_eq!(store.count("ann")?, 1);

    // Her next page does, escaped and styled by level; the cookie is set.
    let page = navigate(&ann, &format!("{base}/?user=ann"))?;
    let set_cookie = page.headers().get("set-cookie").cloned();
    let body = page.text()?;
    assert!(
        body.contains(
            "<p class=\"message message-success\">Report &lt;ready&gt; &amp; waiting</p>"
        ),
        "{body}"
    );
    assert_eq!(
        set_cookie
            .as_ref()
            .map(|value| value.to_str())
            .transpose()?,
        Some("user=ann; Path=/")
    );
    // The server commits the lease after writing the page, so possibly
    // after this client has read it: wait for it (no timing assumed).
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.count("ann")? != 0 {
        assert!(Instant::now() < deadline, "the lease was never committed");
        std::thread::sleep(Duration::from_millis(10));
    }

    // The cookie identifies her from now on; shown once.
    let body = navigate(&ann, &format!("{base}/"))?.text()?;
    assert!(body.contains("You are <b>ann</b>"), "{body}");
    assert!(!body.contains("Report"), "{body}");
    Ok(())
}

#[test]
fn the_send_form_queues_a_message() -> TestResult {
    let (addr, store, _dir) = start()?;
    let base = format!("http://{addr}");
    let bob = browser()?;
    let response = bob
        .post(format!("{base}/send"))
        .form(&[("to", "bob"), ("text", "Hi Bob")])
        .send()?;
    assert_eq!(response.status().as_u16(), 303);
    assert_eq!(store.count("bob")?, 1);
    let body = navigate(&bob, &format!("{base}/?user=bob"))?.text()?;
    assert!(body.contains("Hi Bob"), "{body}");
    Ok(())
}
