//! The request hook without a web framework: `examples/std_net_server.rs`
//! (plain `std::net`) served on 127.0.0.1 and driven over HTTP.

#[allow(dead_code)] // `main` is not called.
#[path = "../examples/std_net_server.rs"]
mod std_net_server;
mod web_client;

use std::error::Error;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use async_messages::{DeliveryMode, MessageStore, RequestHook};
use web_client::Client;

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

#[test]
fn the_hook_delivers_once_to_the_next_page() -> TestResult {
    let (addr, store, _dir) = start()?;
    store.success("ann", "Report <ready> & waiting")?;

    let mut anonymous = Client::new(addr);
    let page = anonymous.page("/")?;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Anonymous"), "{}", page.body);
    assert!(!page.body.contains("Report"), "{}", page.body);

    // An XHR from Ann's page does not take it.
    let mut ann = Client::new(addr);
    let xhr = ann.get("/?user=ann", &[("X-Requested-With", "XMLHttpRequest")])?;
    assert!(!xhr.body.contains("Report"), "{}", xhr.body);
    assert_eq!(store.count("ann")?, 1);

    // Her next page does, escaped and styled by level; the cookie is set.
    let page = ann.page("/?user=ann")?;
    assert!(
        page.body.contains(
            "<p class=\"message message-success\">Report &lt;ready&gt; &amp; waiting</p>"
        ),
        "{}",
        page.body
    );
    assert_eq!(page.header("set-cookie"), Some("user=ann; Path=/"));
    // The server commits the lease after writing the page, so possibly
    // after this client has read it: wait for it (no timing assumed).
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.count("ann")? != 0 {
        assert!(Instant::now() < deadline, "the lease was never committed");
        std::thread::sleep(Duration::from_millis(10));
    }

    // The cookie identifies her from now on; shown once.
    let page = ann.page("/")?;
    assert!(page.body.contains("You are <b>ann</b>"), "{}", page.body);
    assert!(!page.body.contains("Report"), "{}", page.body);
    Ok(())
}

#[test]
fn the_send_form_queues_a_message() -> TestResult {
    let (addr, store, _dir) = start()?;
    let mut bob = Client::new(addr);
    let response = bob.post_form("/send", &[("to", "bob"), ("text", "Hi Bob")])?;
    assert_eq!(response.status, 303);
    assert_eq!(store.count("bob")?, 1);
    let page = bob.page("/?user=bob")?;
    assert!(page.body.contains("Hi Bob"), "{}", page.body);
    Ok(())
}
