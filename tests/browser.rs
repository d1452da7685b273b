//! The web demo in a real browser: headless Chromium, driven through
//! chromedriver with fantoccini (WebDriver), logs in, sends a message with
//! the form, sees it on the next page (and not on the one after), starts a
//! report and sees it arrive on the open page, and sees a message sent by
//! another session appear without a reload. Plain HTTP (the other session)
//! goes through reqwest. Screenshots go to `target/screenshots/`.
//!
//! Needs the Debian packages `chromium` and `chromium-driver` (`.ci/run`
//! installs them). Without them the test fails if `CI` is set and is skipped
//! (with a `SKIPPED` line on stderr) otherwise.
#![cfg(feature = "axum")]

mod common;
#[allow(dead_code)] // `main` and helpers the test does not call.
#[path = "../examples/web_demo.rs"]
mod web_demo;

use std::error::Error;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_messages::MessageStore;
use fantoccini::wd::TimeoutConfiguration;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

/// Generous: Chromium starts slowly on a busy machine.
const PATIENCE: Duration = Duration::from_secs(30);

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// chromedriver on a port of its choosing; killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(program: &Path) -> TestResult<Driver> {
        let mut child = Command::new(program)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        // "ChromeDriver was started successfully on port 40099."
        let port = loop {
            let Some(line) = lines.next() else {
                let _ = child.kill();
                let _ = child.wait();
                return Err("chromedriver exited before saying its port".into());
            };
            let line = line?;
            if let Some(rest) = line.split("started successfully on port ").nth(1) {
                break rest.trim_end_matches('.').trim().parse::<u16>()?;
            }
        };
        // Keep draining its output so that it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless Chromium session on `driver` (plain HTTP to chromedriver on
/// 127.0.0.1, so no TLS connector).
async fn open_browser(driver: &Driver, chromium: &Path, profile: &Path) -> TestResult<Client> {
    let options = json!({
        "binary": chromium,
        "args": [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
            "--disable-crash-reporter", "--window-size=1000,900",
            format!("--user-data-dir={}", profile.display()),
        ],
    });
    let mut capabilities = serde_json::Map::new();
    capabilities.insert("goog:chromeOptions".into(), options);
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client = ClientBuilder::new(connector)
        .capabilities(capabilities)
        .connect(&driver.url)
        .await?;
    client
        .update_timeouts(TimeoutConfiguration::new(
            Some(PATIENCE),
            Some(Duration::from_secs(60)),
            Some(Duration::ZERO),
        ))
        .await?;
    Ok(client)
}

/// The page's visible text.
async fn page_text(browser: &Client) -> TestResult<String> {
    let text = browser
        .execute(
            "return document.body ? document.body.innerText : '';",
            vec![],
        )
        .await?;
    Ok(text.as_str().unwrap_or_default().to_owned())
}

/// Waits (up to `PATIENCE`) for a page whose text satisfies `done`.
async fn wait_for_text(
    browser: &Client,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> TestResult<String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = page_text(browser).await?;
        if done(&text) {
            return Ok(text);
        }
        if Instant::now() > deadline {
            return Err(format!("waited for {what}; the page says: {text}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn type_into(browser: &Client, css: &str, text: &str) -> TestResult {
    let field = browser
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css(css))
        .await?;
    field.clear().await?;
    field.send_keys(text).await?;
    Ok(())
}

async fn click(browser: &Client, css: &str) -> TestResult {
    let element = browser
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css(css))
        .await?;
    element.click().await?;
    Ok(())
}

async fn script(browser: &Client, script: &str) -> TestResult<Value> {
    Ok(browser.execute(script, vec![]).await?)
}

async fn screenshot(browser: &Client, name: &str) -> TestResult {
    let png = browser.screenshot().await?;
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("screenshots");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(name), png)?;
    Ok(())
}

/// Waits (up to `PATIENCE`) until `user` has nothing queued: what a page
/// or stream took is committed right after it was handed over.
async fn wait_until_taken(store: &MessageStore, user: &str) -> TestResult {
    let deadline = Instant::now() + PATIENCE;
    while store.count(user)? != 0 {
        assert!(Instant::now() < deadline, "{user}'s messages stay queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A second session (plain HTTP): logs in as `user`.
async fn other_session(site: &str, user: &str) -> TestResult<reqwest::Client> {
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()?;
    let response = client
        .post(format!("{site}/login"))
        .form(&[("user", user)])
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 303, "login as {user}");
    Ok(client)
}

#[test]
fn chromium_logs_in_sends_and_sees_the_message_once() -> TestResult {
    let (Some(chromium), Some(chromedriver)) =
        (find_program("chromium"), find_program("chromedriver"))
    else {
        common::missing_prerequisite(
            "chromium and chromedriver are not installed \
             (apt-get install -y chromium chromium-driver)",
        );
        return Ok(());
    };

    // The demo app on a free port, with its own store.
    let served = common::web::serve("async-messages-browser-", web_demo::app)?;
    let site = format!("http://{}", served.addr);
    let profile = served.dir.path().join("chromium-profile");
    let driver = Driver::start(&chromedriver)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let browser = open_browser(&driver, &chromium, &profile).await?;
        let result = scenarios(&browser, &site, &served.store).await;
        let closed = browser.close().await;
        result?;
        Ok::<_, Box<dyn Error>>(closed?)
    })?;
    drop(driver);
    Ok(())
}

async fn scenarios(browser: &Client, site: &str, store: &MessageStore) -> TestResult {
    // Log in.
    browser.goto(&format!("{site}/")).await?;
    type_into(browser, "#user", "ann").await?;
    click(browser, "#login").await?;
    wait_for_text(browser, "the login", |text| {
        text.contains("Logged in as ann")
    })
    .await?;

    // Send a message to ourselves with the form (`to` is prefilled).
    let sent = "Hello Ann, this came through the form <b>and stays text</b>";
    type_into(browser, "#text", sent).await?;
    click(browser, "#level option[value=success]").await?;
    click(browser, "#send").await?;

    // The send redirects to the next page, which shows it, styled by level.
    let text = wait_for_text(browser, "the message", |text| text.contains(sent)).await?;
    assert!(text.contains("SUCCESS"), "the level is shown: {text}");
    let bold = script(
        browser,
        "return document.querySelectorAll('.messages b').length;",
    )
    .await?;
    assert_eq!(bold, json!(0), "the message's HTML was interpreted");
    let class = script(
        browser,
        "return document.querySelector('.messages li').className;",
    )
    .await?;
    assert_eq!(class, json!("message message-success"));
    screenshot(browser, "web_demo.png").await?;

    // Reloading: shown once.
    browser.refresh().await?;
    let text = wait_for_text(browser, "the reload", |text| {
        text.contains("Logged in as ann")
    })
    .await?;
    assert!(!text.contains(sent), "shown twice: {text}");
    assert!(text.contains("No new messages."), "{text}");

    // A background job: its message arrives on the open page.
    click(browser, "#report").await?;
    wait_for_text(browser, "the report", |text| {
        text.contains("Your report is ready")
    })
    .await?;
    screenshot(browser, "web_demo_report.png").await?;
    wait_until_taken(store, "ann").await?;

    // Live: a message from another session appears on the open page,
    // without a reload, and stays text.
    browser.goto(&format!("{site}/")).await?;
    wait_for_text(browser, "a fresh page", |text| {
        text.contains("No new messages.")
    })
    .await?;
    script(browser, "window.notReloaded = true; return null;").await?;
    let bob = other_session(site, "bob").await?;
    let live = "Bob: your export is ready <img src=x onerror=alert(1)>";
    let response = bob
        .post(format!("{site}/send"))
        .form(&[("to", "ann"), ("text", live), ("level", "info")])
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 303);
    let item = browser
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css("#messages li.live"))
        .await?;
    assert_eq!(item.text().await?, format!("INFO{live}"));
    assert_eq!(
        item.attr("class").await?.as_deref(),
        Some("message message-info live")
    );
    let still = script(browser, "return window.notReloaded === true;").await?;
    assert_eq!(still, json!(true), "the page was reloaded");
    let images = script(
        browser,
        "return document.querySelectorAll('#messages img').length;",
    )
    .await?;
    assert_eq!(images, json!(0), "the message's HTML was interpreted");
    let text = page_text(browser).await?;
    assert!(!text.contains("No new messages."), "{text}");
    screenshot(browser, "live_message.png").await?;

    // Shown once: taken by the stream, not by the next page.
    wait_until_taken(store, "ann").await?;
    browser.refresh().await?;
    let text = wait_for_text(browser, "the reload", |text| {
        text.contains("Logged in as ann")
    })
    .await?;
    assert!(
        !text.contains("your export is ready"),
        "shown twice: {text}"
    );
    Ok(())
}
