//! The wall clock the store reads for send times and expiry, replaceable
//! in tests.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// Where a store reads the time of day: send times and expiry deadlines
/// are wall-clock times (milliseconds since the Unix epoch), stored with
/// each message, so that they mean the same after a restart and on every
/// server sharing a Redis engine.
///
/// The default is [`SystemClock`]. Tests pass a [`ManualClock`] to
/// [`Builder::clock`](crate::Builder::clock) and move it forward instead of
/// sleeping. Lease timeouts do not use this clock (they measure elapsed
/// time on the monotonic clock, or on Redis's clock).
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The time now.
    fn now(&self) -> SystemTime;
}

/// The operating system's clock ([`SystemTime::now`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to; clones share the time. For
/// tests of expiry:
///
/// ```
/// use std::time::Duration;
/// use async_messages::{Level, ManualClock, MessageStore};
///
/// let clock = ManualClock::new();
/// let store = MessageStore::builder().in_memory().clock(clock.clone()).open()?;
/// store
///     .compose("Lunch is in the kitchen", Level::Info)
///     .expires_after(Duration::from_secs(3600))
///     .to_user(7_u64)?;
/// clock.advance(Duration::from_secs(3601));
/// assert!(store.get_messages(7_u64)?.is_empty());
/// # Ok::<(), async_messages::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    /// A clock showing the system's time now (then standing still).
    #[must_use]
    pub fn new() -> ManualClock {
        ManualClock::at(SystemTime::now())
    }

    /// A clock showing `time`.
    #[must_use]
    pub fn at(time: SystemTime) -> ManualClock {
        ManualClock(Arc::new(Mutex::new(time)))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock();
        *now += by;
    }

    /// Sets the clock to `time`, also backwards (a wall-clock jump).
    pub fn set(&self, time: SystemTime) {
        *self.0.lock() = time;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock()
    }
}

/// Milliseconds since the Unix epoch (0 before it, saturating far after).
pub(crate) fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The expiry time of a message sent at `sent_at_ms` that expires `after`
/// (saturating far in the future).
pub(crate) fn deadline_ms(sent_at_ms: u64, after: Duration) -> u64 {
    sent_at_ms.saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX))
}

/// `clock`'s time in milliseconds since the Unix epoch.
pub(crate) fn now_ms(clock: &dyn Clock) -> u64 {
    millis(clock.now())
}
