//! The test helper `common::redis` itself: a real `redis-server` starts on
//! a free port, answers raw RESP, comes back on the same port with its data
//! after a SIGKILL, and with a password refuses unauthenticated commands.

mod common;

use std::net::TcpStream;

use common::redis::{RedisServer, raw_command};

#[test]
fn starts_answers_ping_and_stops() {
    let Some(mut server) = RedisServer::start_or_skip() else {
        return;
    };
    let port = server.port();
    assert!(server.is_running());
    assert_eq!(server.url(), format!("redis://127.0.0.1:{port}/0"));
    assert_eq!(raw_command(&port.to_string(), &["PING"]), "+PONG");
    assert_eq!(server.command(&["PING"]), "+PONG");
    assert_eq!(
        server.command(&["CONFIG", "GET", "appendfsync"]),
        "appendfsync\neverysec"
    );
    assert_eq!(server.command(&["CONFIG", "GET", "save"]), "save\n");
    assert_eq!(server.command(&["GET", "missing"]), "(nil)");
    assert_eq!(server.command(&["INCR", "n"]), ":1");
    assert!(server.command(&["NOSUCHCOMMAND"]).starts_with("-ERR "));
    assert!(server.dir().join("appendonlydir").is_dir());
    assert!(server.dir().join("redis.log").is_file());

    server.stop();
    assert!(!server.is_running());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    // A clean stop then a restart: the AOF is replayed.
    server.restart();
    assert_eq!(server.port(), port);
    assert_eq!(server.command(&["GET", "n"]), "1");
}

#[test]
fn kill_9_then_restart_on_the_same_port_replays_the_aof() {
    let Some(mut server) = RedisServer::builder().appendfsync("always").start_or_skip() else {
        return;
    };
    let port = server.port();
    let url = server.url();
    assert_eq!(
        server.command(&["CONFIG", "GET", "appendfsync"]),
        "appendfsync\nalways"
    );
    assert_eq!(server.command(&["SET", "k", "v"]), "+OK");
    // A connection left open across the kill, as a client pool would.
    let _held = TcpStream::connect(("127.0.0.1", port)).expect("connect");

    server.kill();
    assert!(!server.is_running());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    server.kill(); // a second kill does nothing

    server.restart();
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    assert_eq!(server.url(), url);
    assert_eq!(raw_command(&url, &["PING"]), "+PONG");
    assert_eq!(server.command(&["GET", "k"]), "v");

    // Twice in a row, quickly: the port is in TIME_WAIT each time.
    server.kill();
    server.restart();
    assert_eq!(server.command(&["GET", "k"]), "v");

    // The port held by another process for a moment: restart retries.
    server.kill();
    let holder = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the port");
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(holder);
    });
    server.restart();
    release.join().expect("release thread");
    assert_eq!(server.command(&["GET", "k"]), "v");
}

#[test]
fn a_password_server_refuses_unauthenticated_commands() {
    let Some(server) = RedisServer::builder()
        .password(Some("s3cret"))
        .start_or_skip()
    else {
        return;
    };
    let port = server.port();
    assert_eq!(server.url(), format!("redis://:s3cret@127.0.0.1:{port}/0"));
    let unauthenticated = raw_command(&port.to_string(), &["PING"]);
    assert!(unauthenticated.starts_with("-NOAUTH"), "{unauthenticated}");
    let wrong = raw_command(&format!("redis://:wrong@127.0.0.1:{port}/0"), &["PING"]);
    assert!(wrong.starts_with("-WRONGPASS"), "{wrong}");
    assert_eq!(raw_command(&server.url(), &["PING"]), "+PONG");
    // Another database of the URL is selected first.
    let db1 = format!("redis://:s3cret@127.0.0.1:{port}/1");
    assert_eq!(raw_command(&db1, &["SET", "k", "in 1"]), "+OK");
    assert_eq!(raw_command(&db1, &["GET", "k"]), "in 1");
    assert_eq!(server.command(&["GET", "k"]), "(nil)");

    // Dropping the server kills it.
    drop(server);
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}
