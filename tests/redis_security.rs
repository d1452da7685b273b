//! Redis URLs with a password, and `rediss://` (TLS), work; a password never
//! shows in an error.
#![cfg(feature = "redis")]

mod common;

use std::path::Path;
use std::process::Command;

use async_messages::{Error, MessageStore};
use common::redis::RedisServer;
use common::texts;

#[test]
fn a_url_with_a_password_works_and_a_wrong_one_is_a_typed_error_without_it() {
    let Some(server) = RedisServer::builder()
        .password(Some("s3cretpw"))
        .start_or_skip()
    else {
        return;
    };
    let store = MessageStore::builder()
        .redis(server.url())
        .open()
        .expect("the right password opens the store");
    store.info(1_u64, "through AUTH").expect("send");
    assert_eq!(
        texts(&store.get_messages(1_u64).expect("drain")),
        ["through AUTH"]
    );

    let wrong = format!("redis://:wrongpw@127.0.0.1:{}/0", server.port());
    let error = MessageStore::builder().redis(&wrong).open().unwrap_err();
    assert!(matches!(error, Error::Redis { .. }), "{error:?}");
    let shown = error.to_string();
    assert!(
        shown.contains(&format!("redis://:***@127.0.0.1:{}/0", server.port())),
        "{shown}"
    );
    assert!(!shown.contains("wrongpw"), "the password leaked: {shown}");

    let missing = format!("redis://127.0.0.1:{}/0", server.port());
    let store = MessageStore::builder().redis(&missing).open();
    assert!(matches!(store, Err(Error::Redis { .. })), "{store:?}");
}

/// Writes a CA and a server certificate for 127.0.0.1 with openssl.
fn certificates(dir: &Path) -> bool {
    let run = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .is_ok_and(|out| out.status.success())
    };
    std::fs::write(
        dir.join("san.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("write san.cnf");
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=async-messages test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]) && run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]) && run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
        "-out",
        "server.crt",
    ])
}

/// The TLS check runs in a child process: it trusts the test CA through
/// `SSL_CERT_FILE` (as an operator with a private CA would), which must be
/// set before anything reads the system's certificates.
#[test]
fn rediss_urls_connect_over_tls() {
    if let Ok(url) = std::env::var("ASYNC_MESSAGES_TLS_URL") {
        let store = MessageStore::builder()
            .redis(&url)
            .namespace("tls")
            .open()
            .expect("open over TLS");
        store.info("ann", "over TLS").expect("send");
        assert_eq!(
            texts(&store.get_messages("ann").expect("drain")),
            ["over TLS"]
        );
        return;
    }
    if Command::new("openssl").arg("version").output().is_err() {
        common::missing_prerequisite("openssl (to make test certificates) is not installed");
        return;
    }
    let certs = tempfile::tempdir().expect("temporary directory");
    assert!(
        certificates(certs.path()),
        "openssl could not make the test certificates"
    );
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let file = |name: &str| certs.path().join(name).display().to_string();
    let Some(server) = RedisServer::builder()
        .arg("--tls-port")
        .arg(&tls_port.to_string())
        .arg("--tls-cert-file")
        .arg(&file("server.crt"))
        .arg("--tls-key-file")
        .arg(&file("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(&file("ca.crt"))
        .arg("--tls-auth-clients")
        .arg("no")
        .start_or_skip()
    else {
        return;
    };
    let url = format!("rediss://127.0.0.1:{tls_port}/0");
    let child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "rediss_urls_connect_over_tls", "--nocapture"])
        .env("ASYNC_MESSAGES_TLS_URL", &url)
        .env("SSL_CERT_FILE", file("ca.crt"))
        .output()
        .expect("run the child");
    assert!(
        child.status.success(),
        "the TLS child failed:\n{}\n{}",
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    // The message really went through this server.
    assert_eq!(server.command(&["EXISTS", "tls:id"]), ":1");

    // Without trusting the CA, the certificate is refused: a typed error.
    let refused = MessageStore::builder().redis(&url).open();
    assert!(matches!(refused, Err(Error::Redis { .. })), "{refused:?}");
}
