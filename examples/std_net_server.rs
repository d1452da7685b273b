//! The request hook in a web server with no framework at all: plain
//! `std::net`, one thread per connection. Any server that can read a
//! method and a few headers can deliver messages the same way.
//!
//! ```text
//! cargo run --example std_net_server
//! # then open http://127.0.0.1:3001/?user=ann (ASYNC_MESSAGES_ADDR to change it)
//! ```
//!
//! The user is the `user` cookie or the `?user=` query parameter: no
//! authentication, a demo only. Messages are leased
//! ([`DeliveryMode::AtLeastOnce`]): they are removed only once the page has
//! been written to the connection.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use async_messages::{DeliveryMode, Level, MessageStore, RequestHook, RequestKind, UserId};

/// Serves requests from `listener` until it fails; one thread per connection.
pub fn serve(listener: &TcpListener, hook: &RequestHook) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let hook = hook.clone();
        thread::spawn(move || {
            if let Err(error) = handle(stream, &hook) {
                eprintln!("connection failed: {error}");
            }
        });
    }
}

struct Request {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: String,
}

fn handle(stream: TcpStream, hook: &RequestHook) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let request = read_request(&mut reader)?;
    let mut stream = stream;

    if request.method == "POST" && request.path == "/send" {
        let to = param(&request.body, "to").unwrap_or_default();
        let text = param(&request.body, "text").unwrap_or_default();
        // This thread is the request's own: blocking on the disk is fine.
        let sent = hook.store().message_user(to.as_str(), text, Level::Info);
        let (status, location) = match sent {
            Ok(_) => ("303 See Other", "/"),
            Err(_) => ("400 Bad Request", "/"),
        };
        return write!(
            stream,
            "HTTP/1.1 {status}\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }

    // Who is asking: the query wins over the cookie, and is remembered.
    let from_query = param(&request.query, "user").filter(|user| !user.is_empty());
    let user = from_query
        .clone()
        .or_else(|| cookie(&request.headers, "user"));

    // What kind of request it is: the hook reads the headers it needs.
    let kind = request
        .headers
        .iter()
        .fold(RequestKind::new(&request.method), |kind, (name, value)| {
            kind.header(name, value)
        });
    let delivery = hook.on_request(user.as_deref().map(UserId::from), &kind);

    let mut body = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>std::net + async-messages</title></head><body>\
         <h1>std::net + async-messages</h1>",
    );
    for message in delivery.messages() {
        body.push_str(&format!(
            "<p class=\"message message-{}\">{}</p>",
            message.level(),
            escape(message.text())
        ));
    }
    match &user {
        Some(user) => body.push_str(&format!("<p>You are <b>{}</b>.</p>", escape(user))),
        None => body.push_str("<p>Anonymous: add <code>?user=ann</code> to the address.</p>"),
    }
    body.push_str(
        "<form method=\"post\" action=\"/send\">To <input name=\"to\"> \
         Text <input name=\"text\"> <button>Send</button></form></body></html>",
    );

    let set_cookie = from_query
        .map(|user| format!("Set-Cookie: user={}; Path=/\r\n", encode_cookie(&user)))
        .unwrap_or_default();
    let written = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n{set_cookie}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .and_then(|()| stream.flush());
    // Leased messages are removed only if the page went out; otherwise they
    // come back on the next request.
    delivery.finish(if written.is_ok() { 200 } else { 500 });
    written
}

fn read_request(reader: &mut impl BufRead) -> io::Result<Request> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let target = parts.next().unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (path, query) = (path.to_owned(), query.to_owned());
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
            break;
        }
        if let Some((name, value)) = line.trim_end().split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    let length = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.parse::<u64>().ok())
        .unwrap_or(0)
        .min(64 * 1024);
    let mut body = String::new();
    reader.take(length).read_to_string(&mut body)?;
    Ok(Request {
        method,
        path,
        query,
        headers,
        body,
    })
}

/// A parameter of a query string or form body, percent-decoded.
fn param(encoded: &str, name: &str) -> Option<String> {
    encoded
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| decode(value))
}

fn cookie(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .filter(|(header, _)| header.eq_ignore_ascii_case("cookie"))
        .flat_map(|(_, value)| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| decode(value))
        .filter(|user| !user.is_empty())
}

fn decode(encoded: &str) -> String {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (byte, hex) {
            (b'%', Some(value)) => {
                out.push(value);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn encode_cookie(value: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[allow(dead_code)] // The tests include this file as a module, without `main`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("ASYNC_MESSAGES_ADDR").unwrap_or_else(|_| "127.0.0.1:3001".into());
    let path = std::env::var_os("ASYNC_MESSAGES_PATH").map_or_else(
        || std::env::temp_dir().join("async-messages-std-net"),
        Into::into,
    );
    let store = MessageStore::open(path)?;
    let hook = RequestHook::new(store).mode(DeliveryMode::AtLeastOnce);
    let listener = TcpListener::bind(&addr)?;
    println!("listening on http://{}/?user=ann", listener.local_addr()?);
    serve(&listener, &hook);
    Ok(())
}
