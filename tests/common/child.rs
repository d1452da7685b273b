//! A child process for the crash tests: the test binary re-run as one of its
//! own ignored tests, printing one line per step on stdout.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// In the child: prints `line` on stdout, whole and flushed, so that the
/// parent sees it before a kill.
pub fn say(line: String) {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes()).expect("write stdout");
    out.write_all(b"\n").expect("write stdout");
    out.flush().expect("flush stdout");
}

/// The command that re-runs this test binary as its ignored test `name`
/// (add the environment and pipes, then spawn it with [`Running::spawn`]).
pub fn command(name: &str) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("test binary path"));
    command.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    command
}

/// Reads the child's stdout on a thread: complete lines go to the channel.
pub fn read_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                // A line cut off by the kill has no newline: not printed.
                Ok(_) if line.last() == Some(&b'\n') => {
                    line.pop();
                    if tx
                        .send(String::from_utf8_lossy(&line).into_owned())
                        .is_err()
                    {
                        return;
                    }
                }
                _ => return,
            }
        }
    });
    rx
}

/// The last lines of a child's output, for a failure message.
pub fn tail(lines: &[String]) -> &[String] {
    &lines[lines.len().saturating_sub(20)..]
}

/// Why [`Running::wait_for`] found no line.
pub enum Stopped {
    /// Nothing for 60 s.
    Timeout,
    /// The child exited.
    Exited(ExitStatus),
    /// The child closed its output.
    Closed,
}

/// A running child, its output read on a thread; killed when dropped.
pub struct Running {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// The complete lines read so far.
    pub seen: Vec<String>,
}

impl Running {
    /// Spawns `command` with its stdout piped.
    pub fn spawn(mut command: Command) -> Running {
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the child");
        let lines = read_lines(&mut child);
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines into `seen` until one that `want` accepts (the last in
    /// `seen`), for at most 60 s.
    pub fn wait_for(&mut self, want: impl Fn(&str) -> bool) -> Result<(), Stopped> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let found = want(&line);
                    self.seen.push(line);
                    if found {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if Instant::now() >= deadline {
                        return Err(Stopped::Timeout);
                    }
                    if let Some(status) = self.child.try_wait().expect("try_wait") {
                        return Err(Stopped::Exited(status));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Stopped::Closed),
            }
        }
    }

    /// Moves the lines read so far into `seen`.
    pub fn poll(&mut self) {
        self.seen.extend(self.lines.try_iter());
    }

    /// SIGKILL; returns how the child ended and every complete line it
    /// printed.
    pub fn kill(&mut self) -> (ExitStatus, Vec<String>) {
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait for the child");
        self.seen.extend(self.lines.iter());
        (status, std::mem::take(&mut self.seen))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A message, named by its text `cCYCLE.tTHREAD.sSEQ`: `(cycle, thread, seq)`.
pub type Key = (u64, u64, u64);

/// The text of message `seq` of `thread` in `cycle`: it names its sender.
pub fn text(cycle: u64, thread: usize, seq: u64) -> String {
    format!("c{cycle}.t{thread}.s{seq}")
}

/// The key of a [`text`].
pub fn parse_text(text: &str) -> Option<Key> {
    let mut parts = text.split('.');
    let c = parts.next()?.strip_prefix('c')?.parse().ok()?;
    let t = parts.next()?.strip_prefix('t')?.parse().ok()?;
    let s = parts.next()?.strip_prefix('s')?.parse().ok()?;
    parts.next().is_none().then_some((c, t, s))
}

/// The child's line for a drain that returned `messages`:
/// `drained THREAD USER ID:TEXT ID:TEXT ...`.
pub fn drained_line(thread: usize, from: usize, messages: &[async_messages::Message]) -> String {
    let mut line = format!("drained {thread} {from}");
    for message in messages {
        line.push_str(&format!(" {}:{}", message.id().get(), message.text()));
    }
    line
}

/// How many acknowledged drains returned messages (empty ones prove
/// nothing), from each user's drains in order.
pub fn non_empty_drains<T>(drains: &std::collections::HashMap<usize, Vec<Vec<T>>>) -> u64 {
    drains
        .values()
        .flatten()
        .filter(|drain| !drain.is_empty())
        .count() as u64
}
