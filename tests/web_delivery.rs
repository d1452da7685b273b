//! Delivery over real HTTP: the web demo (`examples/web_demo.rs`) served on
//! 127.0.0.1, driven by a reqwest client that carries the session cookie.
#![cfg(feature = "axum")]

mod common;
#[allow(dead_code)] // `main` and helpers the tests do not call.
#[path = "../examples/web_demo.rs"]
mod web_demo;

use std::error::Error;
use std::time::{Duration, Instant};

use async_messages::DeliveryMode;
use common::web::Served;
use reqwest::blocking::{Client, RequestBuilder};
use reqwest::header::HeaderMap;

type TestResult = Result<(), Box<dyn Error>>;

/// The demo app in `mode` on a free port, with its own store.
fn start(mode: DeliveryMode) -> Result<Served, Box<dyn Error>> {
    common::web::serve("async-messages-web-", |store| {
        web_demo::app_with_mode(store, mode)
    })
}

/// A browser of one server: reqwest with its own cookie jar, redirects not
/// followed (the tests look at them), a generous timeout for a busy machine.
/// The server runs on its own runtime's threads, so the blocking client is
/// used outside any runtime.
struct Browser {
    client: Client,
    base: String,
}

/// A whole response, read so that failing checks can show its body.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

impl Browser {
    fn new(server: &Served) -> Result<Browser, Box<dyn Error>> {
        let client = Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Browser {
            client,
            base: format!("http://{}", server.addr),
        })
    }

    /// A page load, as a browser's navigation sends it.
    fn page(&self, path: &str) -> reqwest::Result<Response> {
        self.get(
            path,
            &[
                ("Accept", "text/html,application/xhtml+xml,*/*;q=0.8"),
                ("Sec-Fetch-Mode", "navigate"),
                ("Sec-Fetch-Dest", "document"),
            ],
        )
    }

    fn get(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Result<Response> {
        let mut request = self.client.get(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        read(request)
    }

    /// An `application/x-www-form-urlencoded` POST.
    fn post_form(&self, path: &str, fields: &[(&str, &str)]) -> reqwest::Result<Response> {
        read(
            self.client
                .post(format!("{}{path}", self.base))
                .form(fields),
        )
    }
}

/// Sends `request` and reads the whole response.
fn read(request: RequestBuilder) -> reqwest::Result<Response> {
    let response = request.send()?;
    Ok(Response {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text()?,
    })
}

/// A browser of `server` logged in as `user`.
fn login(server: &Served, user: &str) -> Result<Browser, Box<dyn Error>> {
    let client = Browser::new(server)?;
    let response = client.post_form("/login", &[("user", user)])?;
    assert_eq!(response.status, 303, "login: {response:?}");
    assert!(
        response.header("set-cookie").is_some(),
        "login sets a cookie"
    );
    let page = client.page("/")?;
    assert!(
        page.body.contains(&format!("Logged in as <b>{user}</b>")),
        "the cookie identifies {user}: {}",
        page.body
    );
    Ok(client)
}

fn send(client: &Browser, to: &str, text: &str, level: &str) -> TestResult {
    let response = client.post_form("/send", &[("to", to), ("text", text), ("level", level)])?;
    assert_eq!(response.status, 303, "send: {response:?}");
    assert_eq!(response.header("location"), Some("/"));
    Ok(())
}

fn ok_page(response: Response) -> String {
    assert_eq!(response.status, 200, "{response:?}");
    response.body
}

#[test]
fn a_message_is_shown_on_the_next_page_once() -> TestResult {
    let server = start(DeliveryMode::AtMostOnce)?;
    let ann = login(&server, "ann")?;
    let bob = login(&server, "bob")?;

    send(&ann, "ann, bob", "Budgets are due Friday", "warning")?;

    let page = ok_page(ann.page("/")?);
    assert!(
        page.contains(
            "<li class=\"message message-warning\"><span class=\"level\">warning</span>Budgets are due Friday</li>"
        ),
        "shown, styled by level: {page}"
    );
    let page = ok_page(ann.page("/")?);
    assert!(
        !page.contains("Budgets are due Friday"),
        "shown twice: {page}"
    );
    assert!(page.contains("No new messages."));

    // Bob's copy is his own: still there after Ann's pages.
    let page = ok_page(bob.page("/")?);
    assert!(page.contains("Budgets are due Friday"), "{page}");
    assert!(!ok_page(bob.page("/")?).contains("Budgets are due Friday"));
    Ok(())
}

#[test]
fn anonymous_requests_see_nothing_and_take_nothing() -> TestResult {
    let server = start(DeliveryMode::AtMostOnce)?;
    server.store.info("ann", "Welcome back")?;

    let anonymous = Browser::new(&server)?;
    let page = ok_page(anonymous.page("/")?);
    assert!(!page.contains("Welcome back"), "{page}");
    assert!(page.contains("name=\"user\""), "the login form is shown");

    // Logged out, Ann is anonymous again.
    let ann = login(&server, "ann")?; // (login's own page load shows it)
    let response = ann.post_form("/logout", &[])?;
    assert_eq!(response.status, 303);
    server.store.info("ann", "While you were out")?;
    let page = ok_page(ann.page("/")?);
    assert!(!page.contains("Logged in as"), "{page}");
    assert!(!page.contains("While you were out"), "{page}");

    // The messages were there all along.
    assert_eq!(server.store.count("ann")?, 1);
    let ann = login(&server, "ann")?;
    drop(ann);
    assert_eq!(server.store.count("ann")?, 0);
    Ok(())
}

#[test]
fn script_requests_do_not_take_the_pages_messages() -> TestResult {
    let server = start(DeliveryMode::AtMostOnce)?;
    let ann = login(&server, "ann")?;
    send(&ann, "ann", "Saved", "success")?;

    let not_pages: [&[(&str, &str)]; 3] = [
        // XMLHttpRequest (jQuery and friends).
        &[
            ("Accept", "text/html, */*; q=0.01"),
            ("X-Requested-With", "XMLHttpRequest"),
        ],
        // fetch() from a page.
        &[
            ("Accept", "*/*"),
            ("Sec-Fetch-Mode", "cors"),
            ("Sec-Fetch-Dest", "empty"),
        ],
        // The favicon.
        &[
            ("Accept", "image/avif,image/webp,image/*,*/*;q=0.8"),
            ("Sec-Fetch-Mode", "no-cors"),
            ("Sec-Fetch-Dest", "image"),
        ],
    ];
    for headers in not_pages {
        let page = ok_page(ann.get("/", headers)?);
        assert!(!page.contains("Saved"), "{headers:?} got the message");
    }
    assert_eq!(server.store.count("ann")?, 1, "still queued");

    let page = ok_page(ann.page("/")?);
    assert!(page.contains("Saved"), "the next page shows it: {page}");
    assert_eq!(server.store.count("ann")?, 0);
    Ok(())
}

#[test]
fn at_least_once_a_failing_page_does_not_lose_messages() -> TestResult {
    let server = start(DeliveryMode::AtLeastOnce)?;
    let ann = login(&server, "ann")?;
    send(&ann, "ann", "Your export finished", "info")?;

    let response = ann.page("/broken")?;
    assert_eq!(response.status, 500);
    assert!(
        response.body.contains("1 message(s) were taken"),
        "the failing handler had the message: {}",
        response.body
    );

    let page = ok_page(ann.page("/")?);
    assert!(page.contains("Your export finished"), "lost: {page}");
    let page = ok_page(ann.page("/")?);
    assert!(
        !page.contains("Your export finished"),
        "not removed: {page}"
    );
    assert_eq!(server.store.count("ann")?, 0);
    Ok(())
}

/// The contrast, so the test above cannot pass by accident: at-most-once
/// delivery (the default) removes the messages when the request takes them,
/// so a failing page loses them.
#[test]
fn at_most_once_a_failing_page_loses_its_messages() -> TestResult {
    let server = start(DeliveryMode::AtMostOnce)?;
    let ann = login(&server, "ann")?;
    send(&ann, "ann", "Your export finished", "info")?;

    let response = ann.page("/broken")?;
    assert_eq!(response.status, 500);
    assert!(response.body.contains("1 message(s) were taken"));
    let page = ok_page(ann.page("/")?);
    assert!(!page.contains("Your export finished"), "{page}");
    Ok(())
}

#[test]
fn html_in_messages_is_shown_as_text() -> TestResult {
    let server = start(DeliveryMode::AtMostOnce)?;
    let ann = login(&server, "ann")?;
    send(
        &ann,
        "ann",
        "<script>alert(1)</script> & \"<img src=x onerror=alert(2)>\"",
        "error",
    )?;

    let page = ok_page(ann.page("/")?);
    assert!(
        page.contains(
            "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;&lt;img src=x onerror=alert(2)&gt;&quot;"
        ),
        "escaped: {page}"
    );
    assert!(!page.contains("<script>alert(1)"), "raw: {page}");
    assert!(!page.contains("<img src=x"), "raw: {page}");

    // User names are escaped too.
    let other = Browser::new(&server)?;
    other.post_form("/login", &[("user", "<i>eve</i>")])?;
    let page = ok_page(other.page("/")?);
    assert!(
        page.contains("Logged in as <b>&lt;i&gt;eve&lt;/i&gt;</b>"),
        "{page}"
    );
    Ok(())
}

#[test]
fn a_report_finished_in_the_background_shows_on_a_later_page() -> TestResult {
    let server = start(DeliveryMode::AtMostOnce)?;
    let ann = login(&server, "ann")?;
    let response = ann.post_form("/report", &[])?;
    assert_eq!(response.status, 303);

    // Load pages until the job is done; no assumption about when.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let page = ok_page(ann.page("/")?);
        if page.contains("Your report is ready") {
            // The item's own class (the stylesheet names every level's
            // class, so the bare name would prove nothing).
            assert!(
                page.contains("<li class=\"message message-success\">"),
                "{page}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no report message after 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let page = ok_page(ann.page("/")?);
    assert!(
        !page.contains("Your report is ready"),
        "shown twice: {page}"
    );
    Ok(())
}

#[test]
fn bad_sends_are_refused_and_store_nothing() -> TestResult {
    let server = start(DeliveryMode::AtMostOnce)?;
    let ann = login(&server, "ann")?;
    for fields in [
        [("to", "ann"), ("text", "hi"), ("level", "loud")],
        [("to", " , "), ("text", "hi"), ("level", "info")],
        [("to", "ann"), ("text", ""), ("level", "info")],
    ] {
        let response = ann.post_form("/send", &fields)?;
        assert_eq!(response.status, 400, "{fields:?}: {response:?}");
    }
    assert_eq!(server.store.count("ann")?, 0);
    Ok(())
}
