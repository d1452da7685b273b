//! The web demo (`examples/web_demo.rs`) as a child process, and a browser
//! for it (reqwest with a cookie store).

use std::error::Error;
use std::time::Duration;

use reqwest::blocking::Client;

use super::child::{self, Running};

type TestResult = Result<(), Box<dyn Error>>;

/// The body of a test binary's ignored child test: runs the demo's `main`
/// until killed, when `marker` is set in the environment (else nothing).
pub fn child(marker: &str, main: fn() -> Result<(), Box<dyn Error>>) {
    if std::env::var_os(marker).is_none() {
        return;
    }
    // The harness printed "test … ... " without a newline.
    child::say(String::new());
    if let Err(error) = main() {
        child::say(format!("error: {error}"));
        std::process::exit(3);
    }
}

/// A demo's address: `http://127.0.0.1:PORT`.
pub struct Demo {
    pub base: String,
}

/// Starts the demo on a free port: this test binary re-run as its ignored
/// test `child` (which must call the demo's `main` when `marker` is set in
/// its environment), with `env` saying where its messages are
/// (`ASYNC_MESSAGES_PATH`, or `ASYNC_MESSAGES_REDIS` and
/// `ASYNC_MESSAGES_NAMESPACE`). The process is killed when the returned
/// `Running` is dropped; its last line in `seen` is the demo's banner.
pub fn start(
    child: &str,
    marker: &str,
    env: &[(&str, &str)],
) -> Result<(Demo, Running), Box<dyn Error>> {
    let mut command = child::command(child);
    command
        .env(marker, "1")
        .env("ASYNC_MESSAGES_ADDR", "127.0.0.1:0")
        .env_remove("ASYNC_MESSAGES_REDIS")
        .env_remove("ASYNC_MESSAGES_PATH")
        .env_remove("ASYNC_MESSAGES_MODE");
    for (name, value) in env {
        command.env(name, value);
    }
    let mut process = Running::spawn(command);
    if process
        .wait_for(|line| line.contains("demo on http://") || line.starts_with("error"))
        .is_err()
    {
        return Err(format!(
            "the demo did not start; it printed {:?}",
            child::tail(&process.seen)
        )
        .into());
    }
    let line = process.seen.last().cloned().unwrap_or_default();
    let base = line
        .split_once("demo on ")
        .and_then(|(_, rest)| rest.split_once(','))
        .map(|(base, _)| base.to_owned())
        .ok_or_else(|| format!("no address in {line:?}"))?;
    Ok((Demo { base }, process))
}

/// A browser: its own cookie jar, redirects not followed (the tests look at
/// them), a generous timeout for a busy machine.
pub fn browser() -> Result<Client, Box<dyn Error>> {
    Ok(Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()?)
}

/// Logs `client` in as `user` on `demo` (a session of that demo).
pub fn login(client: &Client, demo: &Demo, user: &str) -> TestResult {
    let response = client
        .post(format!("{}/login", demo.base))
        .form(&[("user", user)])
        .send()?;
    assert_eq!(response.status().as_u16(), 303, "login as {user}");
    Ok(())
}

pub fn send(client: &Client, demo: &Demo, to: &str, text: &str) -> TestResult {
    let response = client
        .post(format!("{}/send", demo.base))
        .form(&[("to", to), ("text", text), ("level", "info")])
        .send()?;
    assert_eq!(response.status().as_u16(), 303, "send {text:?} to {to}");
    Ok(())
}

/// Loads the page as a browser navigating to it; returns the messages shown
/// (their texts, in order) after checking who is logged in.
pub fn page(client: &Client, demo: &Demo, user: &str) -> Result<Vec<String>, Box<dyn Error>> {
    let response = client
        .get(format!("{}/", demo.base))
        .header("accept", "text/html,application/xhtml+xml")
        .send()?;
    assert_eq!(response.status().as_u16(), 200);
    let body = response.text()?;
    assert!(
        body.contains(&format!("Logged in as <b>{user}</b>")),
        "{user} on {}: {body}",
        demo.base
    );
    Ok(shown(&body))
}

/// The texts of the messages on a demo page.
pub fn shown(body: &str) -> Vec<String> {
    body.lines()
        .filter(|line| line.starts_with("<li class=\"message "))
        .filter_map(|line| {
            let (_, rest) = line.split_once("</span>")?;
            Some(rest.strip_suffix("</li>")?.to_owned())
        })
        .collect()
}
