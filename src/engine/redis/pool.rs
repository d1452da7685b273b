//! A small pool of synchronous connections.
//!
//! Connections are reused while they work. One that has been idle for a
//! while is checked with a `PING` first, so that the first call after a
//! server restart does not fail on a connection the old server closed. A
//! connection error empties the pool (the others are most likely stale
//! too); the next call connects again, so the handle recovers by itself
//! once the server is back.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::{Client, Connection, IntoConnectionInfo, RedisError, RedisResult, RetryMethod};

use super::TIMEOUT;
use crate::{Error, Result};

/// Connections idle longer than this are pinged before use.
const CHECK_AFTER: Duration = Duration::from_secs(1);
/// Idle connections kept.
const MAX_IDLE: usize = 32;
/// How long a retried call keeps trying while the server is unreachable.
const PATIENCE: Duration = Duration::from_secs(4);

pub(super) struct Pool {
    client: Client,
    /// The URL without its password, for errors and logs.
    url: String,
    idle: Mutex<Vec<(Connection, Instant)>>,
}

fn is_connection_error(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
}

/// A connection error, or a server that is not ready yet (`LOADING` while
/// a restarted server replays its AOF, `TRYAGAIN`, `MASTERDOWN`): the
/// request was not run, or its outcome is unknown, and a later try may work.
fn is_transient(error: &RedisError) -> bool {
    is_connection_error(error)
        || matches!(
            error.retry_method(),
            RetryMethod::WaitAndRetry | RetryMethod::RetryImmediately
        )
}

impl Pool {
    pub(super) fn new(url: &str) -> Result<Pool> {
        let redacted = crate::error::redact(url);
        let error = |e| Error::Redis {
            url: redacted.clone(),
            source: Box::new(e),
        };
        // No CLIENT SETINFO after connecting: against a frozen server each
        // would wait out the whole read timeout.
        let info = url.into_connection_info().map_err(error)?;
        let settings = info.redis_settings().clone().set_skip_set_lib_name();
        let client = Client::open(info.set_redis_settings(settings)).map_err(error)?;
        Ok(Pool {
            client,
            url: redacted,
            idle: Mutex::new(Vec::new()),
        })
    }

    pub(super) fn url(&self) -> &str {
        &self.url
    }

    /// The client the pool connects with (URL, password, TLS), for a
    /// connection of its own outside the pool (the live subscriber's).
    pub(super) fn client(&self) -> Client {
        self.client.clone()
    }

    fn error(&self, error: RedisError) -> Error {
        Error::Redis {
            url: self.url.clone(),
            source: Box::new(error),
        }
    }

    fn connect(&self) -> RedisResult<Connection> {
        let con = self.client.get_connection_with_timeout(TIMEOUT)?;
        con.set_read_timeout(Some(TIMEOUT))?;
        con.set_write_timeout(Some(TIMEOUT))?;
        Ok(con)
    }

    fn checkout(&self) -> RedisResult<Connection> {
        loop {
            let Some((mut con, since)) = self.idle.lock().pop() else {
                return self.connect();
            };
            if since.elapsed() < CHECK_AFTER {
                return Ok(con);
            }
            match redis::cmd("PING").query::<()>(&mut con) {
                Ok(()) => return Ok(con),
                Err(_) => self.idle.lock().clear(),
            }
        }
    }

    fn checkin(&self, con: Connection) {
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push((con, Instant::now()));
        }
    }

    /// Runs `call` on a pooled connection; a call that fails on a broken
    /// connection runs again, once, on a new one. Every call must be safe
    /// to run twice (the scripts see to it: sends carry a token, commits
    /// leave a mark, and a lease whose reply was lost only hides its
    /// messages until it times out).
    pub(super) fn run<T>(
        &self,
        mut call: impl FnMut(&mut Connection) -> RedisResult<T>,
    ) -> Result<T> {
        let outcome = self.checkout().and_then(|mut con| {
            let result = call(&mut con);
            if result.as_ref().is_ok() || result.as_ref().is_err_and(|e| !is_connection_error(e)) {
                self.checkin(con);
            }
            result
        });
        match outcome {
            Ok(value) => Ok(value),
            Err(error) if is_connection_error(&error) => {
                self.idle.lock().clear();
                let mut con = self.connect().map_err(|e| self.error(e))?;
                let value = call(&mut con).map_err(|e| self.error(e))?;
                self.checkin(con);
                Ok(value)
            }
            Err(error) => {
                if is_connection_error(&error) {
                    self.idle.lock().clear();
                }
                Err(self.error(error))
            }
        }
    }

    /// [`run`](Self::run) for a call that must not be left in doubt (a
    /// drain's commit): on connection errors, and while a restarted server
    /// is still loading its data, it keeps trying for a few seconds, so
    /// that a server restart in the middle does not leave the caller
    /// without an answer.
    pub(super) fn run_patiently<T>(
        &self,
        mut call: impl FnMut(&mut Connection) -> RedisResult<T>,
    ) -> Result<T> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            match self.run(&mut call) {
                Err(Error::Redis { source, .. })
                    if started.elapsed() < PATIENCE
                        && source
                            .downcast_ref::<RedisError>()
                            .is_some_and(is_transient) =>
                {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }
}
