//! Group commit: one thread makes writes durable for everyone waiting.
//!
//! A writer applies its change, then registers with [`GroupCommit::wait`].
//! The commit thread takes every registration queued so far, runs one flush
//! (one fsync), and wakes them all. A registration that arrives during a
//! flush waits for the next one, so a waiter is only woken by a flush that
//! started after its write.

use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};

use crate::{Error, Result};

type Reply = Sender<Result<(), Error>>;

pub(crate) struct GroupCommit {
    requests: Option<Sender<Reply>>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommit {
    /// Starts the commit thread; `flush` makes all earlier writes durable.
    pub(crate) fn start<F>(flush: F) -> std::io::Result<GroupCommit>
    where
        F: Fn() -> Result<()> + Send + 'static,
    {
        let (requests, queue) = unbounded::<Reply>();
        let thread = std::thread::Builder::new()
            .name("async-messages-commit".into())
            .spawn(move || run(&queue, &flush))?;
        Ok(GroupCommit {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Blocks until a flush that started after this call has finished.
    pub(crate) fn wait(&self, flush_now: impl Fn() -> Result<()>) -> Result<()> {
        let (reply, answer) = bounded(1);
        let sent = self
            .requests
            .as_ref()
            .is_some_and(|requests| requests.send(reply).is_ok());
        if !sent {
            // The commit thread is gone (only during shutdown): flush here.
            return flush_now();
        }
        answer.recv().unwrap_or_else(|_| flush_now())
    }
}

fn run(queue: &Receiver<Reply>, flush: &dyn Fn() -> Result<()>) {
    while let Ok(first) = queue.recv() {
        let mut waiters = vec![first];
        waiters.extend(queue.try_iter());
        // Give writers that are about to register a moment to do so (they
        // were just woken by the previous flush and may not have run yet):
        // one fsync then covers them too.
        for _ in 0..4 {
            std::thread::yield_now();
            let before = waiters.len();
            waiters.extend(queue.try_iter());
            if waiters.len() == before {
                break;
            }
        }
        let result = flush();
        if let Err(error) = &result {
            tracing::error!(%error, waiters = waiters.len(), "group commit failed");
        }
        for waiter in waiters {
            // A waiter that gave up has nothing left to tell.
            let _ = waiter.send(result.as_ref().map(|_| ()).map_err(Error::duplicate));
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        // Closing the channel ends the thread once queued waiters are served.
        drop(self.requests.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
