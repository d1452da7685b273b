//! A real `redis-server` for the integration tests: started on a free port
//! of 127.0.0.1 with its own temporary directory, killed when dropped.
//!
//! The helper does not use the `redis` crate: it only starts and signals
//! processes, and checks readiness (and lets tests send commands, with
//! [`raw_command`]) over a plain `std::net::TcpStream` speaking RESP.
//!
//! Every server runs with `--save "" --appendonly yes` (no RDB snapshots,
//! every write in the append-only file under `dir()/appendonlydir`), so
//! [`RedisServer::kill`] then [`RedisServer::restart`] replays the AOF on the
//! same port and in the same directory: what the server had written (and, with
//! `appendfsync("always")`, fsynced) before the SIGKILL is back.
//!
//! Isolation: there is no FLUSHALL between tests. A test that needs an empty
//! server starts its own (a few milliseconds: `RedisServer::start_or_skip()`);
//! tests that share one server keep apart by key namespace (each its own
//! prefix). The server's log is `dir()/redis.log`; what it prints before the
//! log is open (a bad flag) goes to `dir()/redis.out`. A server that exits
//! while starting fails the test with the tail of both.
//!
//! Readiness: after each spawn the helper polls (AUTH first when a password
//! is set, then) PING until `+PONG`, for up to 10 s, and checks with `INFO
//! server` that the answering process is its own (a free port can be taken
//! between choosing it and the server binding it: a first start then tries
//! another port, a restart keeps its port and retries).
//!
//! Without `redis-server` on `PATH`, [`RedisServer::start_or_skip`] skips the
//! test (or fails it with env `CI` set: `common::missing_prerequisite`).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a start or restart may take before the test fails.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many free ports a first start tries when its port was taken meanwhile.
const PORT_ATTEMPTS: usize = 5;

/// A running (or killed, or stopped) `redis-server` of one test.
pub struct RedisServer {
    /// `None` once killed or stopped.
    child: Mutex<Option<Child>>,
    port: u16,
    password: Option<String>,
    /// The command line without `--port` (added per start).
    args: Vec<String>,
    dir: tempfile::TempDir,
}

/// Options for [`RedisServer::builder`].
pub struct RedisBuilder {
    appendfsync: String,
    password: Option<String>,
    extra: Vec<String>,
}

impl RedisBuilder {
    /// `"always"`, `"everysec"` (the default) or `"no"`.
    pub fn appendfsync(mut self, policy: &str) -> RedisBuilder {
        self.appendfsync = policy.to_owned();
        self
    }

    /// With `Some`, the server requires this password (`--requirepass`). It
    /// goes into [`RedisServer::url`] as is (not percent-encoded): keep to
    /// letters and digits.
    pub fn password(mut self, password: Option<&str>) -> RedisBuilder {
        self.password = password.map(str::to_owned);
        self
    }

    /// One more command-line argument for `redis-server` (for example
    /// `.arg("--maxmemory").arg("10mb")`).
    pub fn arg(mut self, arg: &str) -> RedisBuilder {
        self.extra.push(arg.to_owned());
        self
    }

    /// Starts the server and waits until it answers PING. Panics if
    /// `redis-server` is not on `PATH` or does not come up.
    pub fn start(self) -> RedisServer {
        let program = redis_server_path().unwrap_or_else(|| {
            panic!(
                "redis-server is not on PATH (apt-get install -y redis-server); \
                 use start_or_skip to skip instead"
            )
        });
        let dir = tempfile::Builder::new()
            .prefix("async-messages-redis-")
            .tempdir()
            .expect("cannot create a temporary directory");
        let path = dir.path().to_str().expect("a UTF-8 temp dir").to_owned();
        let mut args: Vec<String> = [
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            &self.appendfsync,
            "--appenddirname",
            "appendonlydir",
            "--dir",
            &path,
            "--logfile",
            &format!("{path}/redis.log"),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "no",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if let Some(password) = &self.password {
            args.push("--requirepass".to_owned());
            args.push(password.clone());
        }
        args.extend(self.extra);
        let mut server = RedisServer {
            child: Mutex::new(None),
            port: 0,
            password: self.password,
            args,
            dir,
        };
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port();
            match server.spawn_and_wait(&program, Instant::now() + READY_TIMEOUT) {
                Ok(()) => return server,
                Err(Failure::PortTaken(why)) => last = why,
                Err(Failure::Fatal(why)) => panic!("{why}"),
            }
        }
        panic!("redis-server found its port taken {PORT_ATTEMPTS} times; last: {last}")
    }

    /// Starts the server, or, when `redis-server` is not on `PATH`, reports a
    /// missing prerequisite (a skip, or a failure with env `CI` set) and
    /// returns `None`.
    pub fn start_or_skip(self) -> Option<RedisServer> {
        if redis_server_path().is_none() {
            super::missing_prerequisite(
                "redis-server is not on PATH (apt-get install -y redis-server)",
            );
            return None;
        }
        Some(self.start())
    }
}

/// Why one spawn did not give a ready server.
enum Failure {
    /// Another process has the port: a first start tries another one.
    PortTaken(String),
    Fatal(String),
}

impl RedisServer {
    /// The default options: `appendfsync everysec`, no password.
    pub fn builder() -> RedisBuilder {
        RedisBuilder {
            appendfsync: "everysec".to_owned(),
            password: None,
            extra: Vec::new(),
        }
    }

    /// A server with the default options (panics without `redis-server`).
    pub fn start() -> RedisServer {
        RedisServer::builder().start()
    }

    /// A server with the default options, or `None` (after a skip line, or a
    /// failure with env `CI` set) when `redis-server` is not on `PATH`.
    pub fn start_or_skip() -> Option<RedisServer> {
        RedisServer::builder().start_or_skip()
    }

    /// `redis://127.0.0.1:PORT/0`, or `redis://:PASSWORD@127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's own directory: `appendonlydir/`, `redis.log`, `redis.out`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends one command (with AUTH first if the server has a password) and
    /// returns the reply as [`raw_command`] renders it.
    pub fn command(&self, args: &[&str]) -> String {
        raw_command(&self.url(), args)
    }

    /// Whether the process is alive (false after `kill`, `stop`, or a crash).
    pub fn is_running(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        match child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                *child = None;
                false
            }
            None => false,
        }
    }

    /// SIGKILL, then waits for the process (nothing is flushed or fsynced).
    /// Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.take_child() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (redis's clean shutdown: the AOF is flushed and fsynced), then
    /// waits for the process to exit. Panics if it has not exited within 10 s
    /// (it is SIGKILLed first).
    pub fn stop(&mut self) {
        let Some(mut child) = self.take_child() else {
            return;
        };
        // std has no SIGTERM, nix's signal feature is not enabled in this
        // crate: the shell's `kill` builtin is wherever redis-server is.
        let sent = Command::new("sh")
            .args(["-c", "kill -TERM \"$1\"", "sh", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "redis-server did not exit within 10 s of SIGTERM (sending it: {sent:?}); \
                         it was killed\n{}",
                        self.log_tails()
                    );
                }
            }
        }
    }

    /// Starts the server again, on the same port and in the same directory
    /// (so it replays its AOF), and waits until it answers PING. The port may
    /// still be held for a moment (redis binds with SO_REUSEADDR, so a
    /// TIME_WAIT is no obstacle): it retries for up to 10 s. Panics if the
    /// server is still running (`kill` or `stop` it first: which one is the
    /// test's point).
    pub fn restart(&mut self) {
        assert!(
            !self.is_running(),
            "restart of a running redis-server: kill() or stop() it first"
        );
        let program = redis_server_path().expect("redis-server is no longer on PATH");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match self.spawn_and_wait(&program, deadline) {
                Ok(()) => return,
                Err(Failure::PortTaken(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(Failure::PortTaken(why) | Failure::Fatal(why)) => {
                    panic!("restart on port {}: {why}", self.port)
                }
            }
        }
    }

    fn take_child(&mut self) -> Option<Child> {
        self.child
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Spawns on `self.port` and waits until this process (not another on the
    /// same port) answers PING. On failure the process is gone.
    fn spawn_and_wait(&mut self, program: &Path, deadline: Instant) -> Result<(), Failure> {
        let log = self.dir().join("redis.log");
        let log_start = std::fs::metadata(&log).map_or(0, |m| m.len());
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join("redis.out"))
            .expect("cannot create redis.out");
        let mut child = Command::new(program)
            .args(&self.args)
            .args(["--port", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup redis.out"))
            .stderr(out)
            .spawn()
            .map_err(|e| Failure::Fatal(format!("cannot run {}: {e}", program.display())))?;
        let pid = child.id();
        // Why it did not come up: the log's new part tells a taken port.
        let failed = |how: String, this: &RedisServer| {
            let why = format!(
                "redis-server on port {} {how}\n{}",
                this.port,
                this.log_tails()
            );
            if read_from(&log, log_start).contains("Address already in use") {
                Failure::PortTaken(why)
            } else {
                Failure::Fatal(why)
            }
        };
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(failed(format!("exited while starting ({status})"), self));
            }
            match self.probe() {
                Some(answering) if answering == pid => {
                    *self.child.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(child);
                    return Ok(());
                }
                // Another redis-server has this port: ours will exit.
                Some(_) | None => {}
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(
                    "did not answer PING in time (10 s); killed".to_owned(),
                    self,
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// AUTH (if a password is set), PING, then the answering server's
    /// process id (from `INFO server`), if it answers +PONG.
    fn probe(&self) -> Option<u32> {
        let addr = ([127, 0, 0, 1], self.port).into();
        let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
        // Short: a foreign listener on the port may never answer (the next
        // probe comes 5 ms later).
        stream
            .set_read_timeout(Some(Duration::from_millis(250)))
            .ok()?;
        stream
            .set_write_timeout(Some(Duration::from_millis(250)))
            .ok()?;
        let mut conn = Conn::new(stream);
        if let Some(password) = &self.password
            && conn.call(&["AUTH", password]).ok()? != "+OK"
        {
            return None;
        }
        // -LOADING while the AOF is replayed: not ready yet.
        if conn.call(&["PING"]).ok()? != "+PONG" {
            return None;
        }
        let info = conn.call(&["INFO", "server"]).ok()?;
        info.lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .and_then(|pid| pid.trim().parse().ok())
    }

    /// The last lines of `redis.log` and `redis.out`, for a failure message.
    fn log_tails(&self) -> String {
        let tail = |name: &str| {
            let text = read_from(&self.dir().join(name), 0);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        format!(
            "--- tail of redis.log ---\n{}\n--- tail of redis.out ---\n{}",
            tail("redis.log"),
            tail("redis.out")
        )
    }
}

impl Drop for RedisServer {
    /// SIGKILL and wait, so that no server outlives its test (even a
    /// panicking one).
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `redis-server` on `PATH`, if any.
pub fn redis_server_path() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|file| {
            std::fs::metadata(file)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A port of 127.0.0.1 that was free a moment ago (bound to port 0, then
/// released). Another process may take it before the server binds it:
/// [`RedisBuilder::start`] then tries another.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("cannot bind 127.0.0.1:0")
        .port()
}

/// The text of a file from byte `offset` (empty if it cannot be read).
fn read_from(path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.seek(SeekFrom::Start(offset));
        let _ = file.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Sends one command to a redis server over a fresh TCP connection and
/// returns its reply, rendered as text:
///
/// - a simple string, an error or an integer as its line without CRLF:
///   `+PONG`, `-NOAUTH Authentication required.`, `:1`;
/// - a bulk string as its content (`GET k` gives `v`), `(nil)` for a null one;
/// - an array as its elements, rendered the same way, one per line (nested
///   arrays flattened): `CONFIG GET appendfsync` gives `appendfsync\nalways`;
///   `(nil)` for a null array, the empty string for an empty one.
///
/// `target` is a URL like [`RedisServer::url`]'s (`redis://[[user]:password@]
/// host:port[/db]`: AUTH and SELECT are sent first, and an error reply to them
/// is returned instead of the command's), or `host:port`, or a bare port of
/// 127.0.0.1. Panics on a connection or protocol error (10 s timeouts).
pub fn raw_command(target: &str, args: &[&str]) -> String {
    let (addr, user, password, db) = parse_target(target);
    let stream = TcpStream::connect(&addr)
        .unwrap_or_else(|e| panic!("cannot connect to redis at {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set_read_timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .expect("set_write_timeout");
    let mut conn = Conn::new(stream);
    let mut call = |args: &[&str]| {
        conn.call(args)
            .unwrap_or_else(|e| panic!("redis at {addr}, {args:?}: {e}"))
    };
    if let Some(password) = password {
        let reply = match &user {
            Some(user) => call(&["AUTH", user, &password]),
            None => call(&["AUTH", &password]),
        };
        if reply != "+OK" {
            return reply;
        }
    }
    if let Some(db) = db.filter(|db| db != "0") {
        let reply = call(&["SELECT", &db]);
        if reply != "+OK" {
            return reply;
        }
    }
    let reply = call(args);
    let _ = conn.reader.get_ref().shutdown(Shutdown::Both);
    reply
}

/// `(host:port, user, password, db)` of a [`raw_command`] target.
fn parse_target(target: &str) -> (String, Option<String>, Option<String>, Option<String>) {
    if let Ok(port) = target.parse::<u16>() {
        return (format!("127.0.0.1:{port}"), None, None, None);
    }
    let Some(rest) = target.strip_prefix("redis://") else {
        return (target.to_owned(), None, None, None);
    };
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (Some(auth), rest),
        None => (None, rest),
    };
    let (addr, db) = match rest.split_once('/') {
        Some((addr, db)) if !db.is_empty() => (addr, Some(db.to_owned())),
        Some((addr, _)) => (addr, None),
        None => (rest, None),
    };
    let (user, password) = match auth.map(|auth| auth.split_once(':').unwrap_or(("", auth))) {
        Some((user, password)) => (
            Some(user.to_owned()).filter(|u| !u.is_empty()),
            Some(password.to_owned()),
        ),
        None => (None, None),
    };
    (addr.to_owned(), user, password, db)
}

/// One RESP (version 2) connection.
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn new(stream: TcpStream) -> Conn {
        Conn {
            reader: BufReader::new(stream),
        }
    }

    /// Sends `args` as a RESP array of bulk strings and reads one reply.
    fn call(&mut self, args: &[&str]) -> std::io::Result<String> {
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        self.reader.get_mut().write_all(&request)?;
        let mut out = Vec::new();
        self.read_reply(&mut out)?;
        Ok(out.join("\n"))
    }

    /// Reads one reply, pushing its rendered lines onto `out`.
    fn read_reply(&mut self, out: &mut Vec<String>) -> std::io::Result<()> {
        let line = self.read_line()?;
        let bad = || {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad reply {line:?}"),
            )
        };
        match line.as_bytes().first() {
            Some(b'+' | b'-' | b':') => out.push(line.clone()),
            Some(b'$') => {
                let len: i64 = line[1..].parse().map_err(|_| bad())?;
                if len < 0 {
                    out.push("(nil)".to_owned());
                } else {
                    let mut bytes = vec![0; len as usize + 2];
                    self.reader.read_exact(&mut bytes)?;
                    bytes.truncate(len as usize);
                    out.push(String::from_utf8_lossy(&bytes).into_owned());
                }
            }
            Some(b'*') => {
                let len: i64 = line[1..].parse().map_err(|_| bad())?;
                if len < 0 {
                    out.push("(nil)".to_owned());
                }
                for _ in 0..len.max(0) {
                    self.read_reply(out)?;
                }
            }
            _ => return Err(bad()),
        }
        Ok(())
    }

    /// One line without its CRLF.
    fn read_line(&mut self) -> std::io::Result<String> {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\r\n") {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed mid-reply",
            ));
        }
        line.truncate(line.len() - 2);
        Ok(String::from_utf8_lossy(&line).into_owned())
    }
}
