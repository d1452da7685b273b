//! Live delivery across processes: a thread per handle, subscribed to the
//! store's channel `ns:live` on a connection of its own (not from the
//! pool: a subscribed connection can run nothing else), turns each
//! notice into a wake-up of this process's watchers. The scripts publish
//! the user's key prefix for a send or a release, and `*` for a bulk send
//! or an announcement.
//!
//! Notices published while the subscriber is disconnected are lost, so
//! after every reconnect it wakes all the watchers, who then read their
//! queues: a wake-up is a hint, and a lost one costs at most a delay until
//! the reconnect. A connection that stays quiet is pinged, so that a
//! server that went away without closing it is noticed too.
//!
//! The thread holds the engine only weakly and stops within
//! [`POLL`] once the engine is dropped.

use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::{Client, Connection, PubSub, RedisError, RedisResult, Value};

use super::{Shared, TIMEOUT};
use crate::live::Notifier;
use crate::{Error, Result, key};

/// How long a read waits before the thread checks that the engine is
/// still there.
const POLL: Duration = Duration::from_millis(500);
/// Quiet time after which the connection is pinged.
const PING_AFTER: Duration = Duration::from_secs(5);
/// The first and the longest pause between reconnection attempts.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const LONGEST_PAUSE: Duration = Duration::from_secs(2);

struct Subscriber {
    engine: Weak<Shared>,
    client: Client,
    /// The URL without its password, for errors and logs.
    url: String,
    channel: String,
    notifier: Arc<Notifier>,
}

/// Why listening ended.
enum Ended {
    /// The engine was dropped.
    Dropped,
    /// The connection broke (or a ping went unanswered).
    Broken(RedisError),
}

/// Starts the subscriber thread and waits until it has subscribed, so that
/// every send after this returns wakes this process's watchers. On
/// [`Error::Redis`] no thread is left running.
pub(super) fn start(shared: &Arc<Shared>) -> Result<()> {
    let subscriber = Subscriber {
        engine: Arc::downgrade(shared),
        client: shared.pool.client(),
        url: shared.pool.url().to_owned(),
        channel: format!("{}:live", shared.ns),
        notifier: shared.common.notifier.clone(),
    };
    let url = subscriber.url.clone();
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| Error::Redis {
        url: url.clone(),
        source,
    };
    let (ready, subscribed) = mpsc::channel();
    std::thread::Builder::new()
        .name("async-messages-redis-live".into())
        .spawn(move || subscriber.run(ready))
        .map_err(|e| failed(Box::new(e)))?;
    match subscribed.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(failed(Box::new(error))),
        Err(_) => Err(failed("the live subscriber thread ended".into())),
    }
}

impl Subscriber {
    fn connect(&self) -> RedisResult<Connection> {
        let con = self.client.get_connection_with_timeout(TIMEOUT)?;
        con.set_write_timeout(Some(TIMEOUT))?;
        con.set_read_timeout(Some(TIMEOUT))?;
        Ok(con)
    }

    /// Subscribes, listens, and after a break subscribes again, until the
    /// engine is dropped. The first outcome goes to `ready`: if the first
    /// subscription fails, the thread ends.
    fn run(self, ready: mpsc::Sender<RedisResult<()>>) {
        let mut ready = Some(ready);
        let mut pause = FIRST_PAUSE;
        loop {
            let ended = self.connect().and_then(|mut con| {
                let mut pubsub = con.as_pubsub();
                pubsub.subscribe(&self.channel)?;
                pubsub.set_read_timeout(Some(POLL))?;
                match ready.take() {
                    Some(ready) => {
                        let _ = ready.send(Ok(()));
                    }
                    None => {
                        tracing::info!(url = %self.url, "the live subscriber is connected again");
                        // Notices sent while it was away are lost: every
                        // watcher reads its queue again.
                        self.notifier.everyone();
                    }
                }
                pause = FIRST_PAUSE;
                Ok(self.listen(&mut pubsub))
            });
            let error = match ended {
                Ok(Ended::Dropped) => return,
                Ok(Ended::Broken(error)) | Err(error) => error,
            };
            if let Some(ready) = ready.take() {
                let _ = ready.send(Err(error));
                return;
            }
            tracing::debug!(%error, url = %self.url, "the live subscriber lost its connection; reconnecting");
            // Waits, checking that the engine is still there.
            let mut waited = Duration::ZERO;
            while waited < pause {
                if self.engine.strong_count() == 0 {
                    return;
                }
                let step = POLL.min(pause - waited);
                std::thread::sleep(step);
                waited += step;
            }
            if self.engine.strong_count() == 0 {
                return;
            }
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
    }

    /// Wakes watchers for each notice until the connection breaks or the
    /// engine is dropped.
    fn listen(&self, pubsub: &mut PubSub<'_>) -> Ended {
        let mut quiet = Duration::ZERO;
        loop {
            match pubsub.get_message() {
                Ok(message) => {
                    quiet = Duration::ZERO;
                    let payload = message.get_payload_bytes();
                    if key::decode_user(payload).is_some() {
                        self.notifier.prefix(payload);
                    } else {
                        self.notifier.everyone();
                    }
                }
                Err(error) if error.is_timeout() => {
                    if self.engine.strong_count() == 0 {
                        return Ended::Dropped;
                    }
                    quiet += POLL;
                    if quiet >= PING_AFTER {
                        quiet = Duration::ZERO;
                        // The full timeout for the answer, then short
                        // reads again.
                        let pinged = pubsub
                            .set_read_timeout(Some(TIMEOUT))
                            .and_then(|()| pubsub.ping::<Value>())
                            .and_then(|_| pubsub.set_read_timeout(Some(POLL)));
                        if let Err(error) = pinged {
                            return Ended::Broken(error);
                        }
                    }
                }
                Err(error) => return Ended::Broken(error),
            }
        }
    }
}
