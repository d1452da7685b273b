//! The web demo in a real browser: headless Chromium, driven through
//! chromedriver's WebDriver API, logs in, sends a message with the form,
//! sees it on the next page (and not on the one after), starts a report and
//! reloads until it is ready. Screenshots go to `target/screenshots/`.
//!
//! Needs the Debian packages `chromium` and `chromium-driver` (`.ci/run`
//! installs them). Without them the test fails if `CI` is set and is skipped
//! (with a `SKIPPED` line on stderr) otherwise.
#![cfg(feature = "axum")]

mod common;
mod web_client;
#[allow(dead_code)] // `main` and helpers the test does not call.
#[path = "../examples/web_demo.rs"]
mod web_demo;

use std::error::Error;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

/// WebDriver's key for element references.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

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
    addr: SocketAddr,
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
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        })
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One WebDriver session (one Chromium); ended when dropped.
struct Browser {
    driver: SocketAddr,
    session: String,
}

impl Browser {
    fn open(driver: &Driver, chromium: &Path, profile: &Path) -> TestResult<Browser> {
        let capabilities = json!({
            "capabilities": { "alwaysMatch": { "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-crash-reporter", "--window-size=1000,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }}}
        });
        let reply = call(driver.addr, "POST", "/session", Some(&capabilities))?;
        let session = reply["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no session id in {reply}"))?
            .to_owned();
        let browser = Browser {
            driver: driver.addr,
            session,
        };
        // Element lookups wait for the page, up to this long.
        browser.cmd(
            "POST",
            "/timeouts",
            json!({"implicit": 20_000, "pageLoad": 60_000}),
        )?;
        Ok(browser)
    }

    fn cmd(&self, method: &str, path: &str, body: Value) -> TestResult<Value> {
        let path = format!("/session/{}{path}", self.session);
        let body = (method == "POST").then_some(&body);
        Ok(call(self.driver, method, &path, body)?["value"].take())
    }

    fn go(&self, url: &str) -> TestResult {
        self.cmd("POST", "/url", json!({ "url": url }))?;
        Ok(())
    }

    fn refresh(&self) -> TestResult {
        self.cmd("POST", "/refresh", json!({}))?;
        Ok(())
    }

    fn find(&self, css: &str) -> TestResult<String> {
        let found = self.cmd(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        )?;
        Ok(found[ELEMENT]
            .as_str()
            .ok_or_else(|| format!("no element {css}: {found}"))?
            .to_owned())
    }

    fn type_into(&self, css: &str, text: &str) -> TestResult {
        let element = self.find(css)?;
        self.cmd("POST", &format!("/element/{element}/clear"), json!({}))?;
        self.cmd(
            "POST",
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        )?;
        Ok(())
    }

    fn click(&self, css: &str) -> TestResult {
        let element = self.find(css)?;
        self.cmd("POST", &format!("/element/{element}/click"), json!({}))?;
        Ok(())
    }

    fn script(&self, script: &str) -> TestResult<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
    }

    /// The page's visible text.
    fn text(&self) -> TestResult<String> {
        Ok(self
            .script("return document.body ? document.body.innerText : '';")?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Waits (up to `PATIENCE`) for a page whose text satisfies `done`.
    fn wait_for_text(&self, what: &str, done: impl Fn(&str) -> bool) -> TestResult<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = self.text()?;
            if done(&text) {
                return Ok(text);
            }
            if Instant::now() > deadline {
                return Err(format!("waited for {what}; the page says: {text}").into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self, path: &Path) -> TestResult {
        let png = self.cmd("GET", "/screenshot", Value::Null)?;
        let png = base64_decode(png.as_str().ok_or("no screenshot")?)?;
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(path.parent().ok_or("no parent")?)?;
        std::fs::write(path, png)?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = call(
            self.driver,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
    }
}

/// One WebDriver command; an error reply becomes an `Err`.
fn call(driver: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> TestResult<Value> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let response = web_client::request(
        driver,
        method,
        path,
        &[("Content-Type", "application/json; charset=utf-8")],
        body.as_bytes(),
    )?;
    let reply: Value = serde_json::from_str(&response.body)?;
    if response.status != 200 {
        return Err(format!("{method} {path}: {} {reply}", response.status).into());
    }
    Ok(reply)
}

fn base64_decode(text: &str) -> TestResult<Vec<u8>> {
    let value = |c: u8| -> TestResult<u32> {
        Ok(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("bad base64 byte {c}").into()),
        }
        .into())
    };
    let clean: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut bits = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            bits |= value(*c)? << (18 - 6 * i);
        }
        let bytes = bits.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Ok(out)
}

/// The directory for screenshots: `target/screenshots` of this workspace.
fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("screenshots")
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
    let (store, dir) = (&served.store, &served.dir);

    let driver = Driver::start(&chromedriver)?;
    let profile = dir.path().join("chromium-profile");
    let browser = Browser::open(&driver, &chromium, &profile)?;

    // Log in.
    browser.go(&format!("{site}/"))?;
    browser.type_into("#user", "ann")?;
    browser.click("#login")?;
    browser.wait_for_text("the login", |text| text.contains("Logged in as ann"))?;

    // Send a message to ourselves with the form (`to` is prefilled).
    let sent = "Hello Ann, this came through the form <b>and stays text</b>";
    browser.type_into("#text", sent)?;
    browser.click("#level option[value=success]")?;
    browser.click("#send")?;

    // The send redirects to the next page, which shows it, styled by level.
    let text = browser.wait_for_text("the message", |text| text.contains(sent))?;
    assert!(text.contains("SUCCESS"), "the level is shown: {text}");
    let bold = browser.script("return document.querySelectorAll('.messages b').length;")?;
    assert_eq!(bold, json!(0), "the message's HTML was interpreted");
    let class = browser.script("return document.querySelector('.messages li').className;")?;
    assert_eq!(class, json!("message message-success"));
    browser.screenshot(&screenshot_dir().join("web_demo.png"))?;

    // Reloading: shown once.
    browser.refresh()?;
    let text = browser.wait_for_text("the reload", |text| text.contains("Logged in as ann"))?;
    assert!(!text.contains(sent), "shown twice: {text}");
    assert!(text.contains("No new messages."), "{text}");

    // A background job: reload until its message appears.
    browser.click("#report")?;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = browser.text()?;
        if text.contains("Your report is ready") {
            break;
        }
        assert!(Instant::now() < deadline, "no report message: {text}");
        std::thread::sleep(Duration::from_millis(200));
        browser.refresh()?;
    }
    browser.screenshot(&screenshot_dir().join("web_demo_report.png"))?;

    assert_eq!(store.count("ann")?, 0, "everything shown was removed");
    drop(browser);
    drop(driver);
    Ok(())
}
