//! Expiry without sleeping: a [`ManualClock`] for the store, and waits for
//! the background reaper (which runs on real time, every second).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_messages::{Level, ManualClock, MessageStore, Result, UserId};

/// How often the engines reap (`REAP_EVERY` in `src/engine/mod.rs`).
pub const REAP_EVERY: Duration = Duration::from_secs(1);

/// How long a wait for background work may take before the test fails:
/// generous, so that a slow machine does not fail a correct engine.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A manual clock standing at the system's time now, cut to whole
/// milliseconds (the store keeps times to the millisecond, so that a
/// message's `sent_at()` is exactly the clock's time).
pub fn manual_clock() -> ManualClock {
    ManualClock::at(whole_ms(SystemTime::now()))
}

/// `time` cut to whole milliseconds.
pub fn whole_ms(time: SystemTime) -> SystemTime {
    let since = time.duration_since(UNIX_EPOCH).expect("after 1970");
    UNIX_EPOCH + Duration::from_millis(since.as_millis() as u64)
}

/// The clock's time in milliseconds since the Unix epoch.
pub fn ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// Polls `done` until it says yes; fails the test with `what` if it has
/// not within [`DEADLINE`].
pub fn wait_until(what: &str, done: impl FnMut() -> Result<bool>) -> Result<()> {
    assert!(poll(done)?, "waited {DEADLINE:?} for {what}");
    Ok(())
}

/// Polls `done` until it says yes (`true`) or [`DEADLINE`] has passed
/// (`false`), so that the caller can say what it saw last.
pub fn poll(mut done: impl FnMut() -> Result<bool>) -> Result<bool> {
    let started = Instant::now();
    loop {
        if done()? {
            return Ok(true);
        }
        if started.elapsed() > DEADLINE {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The user of [`send_sentinel`].
pub fn sentinel() -> UserId {
    UserId::from("reaper-sentinel")
}

/// Queues a message for [`sentinel`] that expires after `after`. Once the
/// clock has moved past that, [`wait_for_reaper`] waits for it to go.
pub fn send_sentinel(store: &MessageStore, after: Duration) -> Result<()> {
    store
        .compose("the reaper takes this", Level::Info)
        .expires_after(after)
        .to_user(sentinel())?;
    Ok(())
}

/// Waits until the reaper has removed the [`sentinel`]'s expired message
/// without anyone reading it (its user is no longer listed by `users()`),
/// then one more reaper period, so that a full pass surely ran after the
/// clock moved.
pub fn wait_for_reaper(store: &MessageStore) -> Result<()> {
    wait_until("the reaper to remove an expired message", || {
        Ok(!store.users()?.contains(&sentinel()))
    })?;
    std::thread::sleep(REAP_EVERY + REAP_EVERY / 2);
    Ok(())
}
