//! Taking spooled messages in (the file format and the sender are in
//! `spool.rs`): at open, whenever inotify reports a new file, and every
//! second in case a notification was missed.
//!
//! Exactly once: a file's messages and a mark naming the file are written in
//! one sled transaction and made durable before the file is removed; a file
//! whose mark exists is only removed. A mark whose file is gone is removed.
//!
//! A spooled message carries its sender's expiry (else the store's default
//! expiry applies, counted from its send) and replace key. One that has
//! expired by the store's clock when it is taken in is dropped with a log
//! line, never stored. Once a send is durable, the recipients' watchers
//! are woken (all of them for a bulk send or an announcement).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use super::bulk::Bulk;
use super::{Inner, STRIPES, sync_dir};
use crate::engine::Outgoing;
use crate::recipients::{Recipients, THRESHOLD};
use crate::spool::format::{Dirs, Entry, read_trusted};
use crate::{Error, Level, Result, UserId, key, record};

/// How often the spool is checked without a notification.
const POLL: Duration = Duration::from_secs(1);

/// The intake thread; stopped (and joined) on drop.
pub(super) struct Intake {
    stop: Arc<AtomicBool>,
    wake: Sender<()>,
    thread: Option<JoinHandle<()>>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Intake {
    pub(super) fn start(inner: Weak<Inner>, dirs: Dirs) -> Result<Intake> {
        let (wake, woken) = mpsc::channel::<()>();
        let notify_wake = wake.clone();
        let watcher = notify::recommended_watcher(move |_event| {
            let _ = notify_wake.send(());
        })
        .and_then(|mut watcher| {
            watcher.watch(&dirs.new, RecursiveMode::NonRecursive)?;
            Ok(watcher)
        })
        .map_err(|error| {
            tracing::warn!(%error, "cannot watch the spool directory; checking it every second instead");
        })
        .ok();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("async-messages-spool".to_owned())
            .spawn(move || {
                loop {
                    match woken.recv_timeout(POLL) {
                        Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                    // One pass for every notification that arrived meanwhile.
                    while woken.try_recv().is_ok() {}
                    if stopping.load(Ordering::Acquire) {
                        return;
                    }
                    let Some(inner) = inner.upgrade() else { return };
                    if let Err(error) = inner.take_in(&dirs) {
                        tracing::warn!(%error, "could not take in the spool; trying again");
                    }
                }
            })
            .map_err(|e| Error::Storage {
                path: Default::default(),
                source: Box::new(e),
            })?;
        Ok(Intake {
            stop,
            wake,
            thread: Some(thread),
            _watcher: watcher,
        })
    }
}

impl Drop for Intake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What to do with one spool file.
enum Outcome {
    /// Stored now, or before (its mark exists): remove the file, then the mark.
    Stored,
    /// Nothing to store (below the minimum level): remove the file.
    Dropped,
    /// Cannot be trusted: move it aside.
    Rejected(String),
}

impl Inner {
    /// Takes in every file in the spool, in name order (send order per
    /// sender). A file that cannot be trusted is moved aside and the others
    /// go on; a storage error stops the pass (the file stays for the next).
    pub(super) fn take_in(&self, dirs: &Dirs) -> Result<()> {
        let mut names: Vec<String> = std::fs::read_dir(&dirs.new)
            .map_err(|e| super::backend::io_error(&dirs.new, e))?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .collect();
        names.sort_unstable();
        let mut removed = false;
        for name in &names {
            let outcome = if self.backend.is_spooled(name.as_bytes())? {
                Outcome::Stored
            } else {
                match read_trusted(dirs, name) {
                    Err(reason) => Outcome::Rejected(reason),
                    Ok(entry) => self.store_spooled(name, entry)?,
                }
            };
            match outcome {
                Outcome::Rejected(reason) => {
                    tracing::warn!(file = %name, %reason, "moving an untrusted spool file aside to spool/rejected");
                    std::fs::rename(dirs.new.join(name), dirs.rejected.join(name))
                        .map_err(|e| super::backend::io_error(&dirs.rejected, e))?;
                }
                Outcome::Stored | Outcome::Dropped => {
                    if !self.intake_pause.is_zero() {
                        std::thread::sleep(self.intake_pause);
                    }
                    std::fs::remove_file(dirs.new.join(name))
                        .map_err(|e| super::backend::io_error(&dirs.new, e))?;
                }
            }
            removed = true;
        }
        if removed {
            sync_dir(&dirs.new)?;
            sync_dir(&dirs.rejected)?;
        }
        // Marks whose file is gone (now, or before a crash) are no longer needed.
        for mark in self.backend.all_spooled()? {
            let name = String::from_utf8_lossy(&mark);
            if !dirs.new.join(name.as_ref()).exists() {
                self.backend.remove_spooled(&mark)?;
            }
        }
        Ok(())
    }

    /// Stores one spooled send with its mark, durably, and wakes the
    /// recipients' watchers.
    fn store_spooled(&self, name: &str, entry: Entry) -> Result<Outcome> {
        let Some(level) = Level::from_value(entry.level) else {
            return Ok(Outcome::Rejected(format!("unknown level {}", entry.level)));
        };
        let rules = self.rules;
        if level < rules.min_level {
            if entry.everyone {
                tracing::warn!(file = %name, %level, minimum = %rules.min_level, "dropping a spooled announcement below the store's minimum level");
            }
            return Ok(Outcome::Dropped);
        }
        let users: BTreeSet<UserId> = entry.users.into_iter().map(UserId::from).collect();
        // The store's own rules, which may be stricter than the sender's.
        let checked = rules
            .check_text(&entry.text)
            .and_then(|()| users.iter().try_for_each(key::check_user))
            .and_then(|()| match &entry.replace_key {
                Some(replace_key) => key::check_replace_key(replace_key),
                None => Ok(()),
            });
        if let Err(error) = checked {
            return Ok(Outcome::Rejected(error.to_string()));
        }
        // The sender's expiry, else the store's default (from the send).
        let expires_at_ms = match (entry.expires_at_ms, entry.never_expires) {
            (Some(at), _) => Some(at),
            (None, true) => None,
            (None, false) => rules
                .default_expiry
                .map(|after| crate::clock::deadline_ms(entry.sent_at_ms, after)),
        };
        let message = Outgoing {
            text: entry.text,
            level,
            sent_at_ms: entry.sent_at_ms,
            expires_at_ms,
            replace_key: entry.replace_key,
        };
        let now_ms = crate::clock::now_ms(&*self.clock);
        if message.expired(now_ms) {
            tracing::info!(file = %name, expired_at_ms = ?message.expires_at_ms, now_ms, "dropping a spooled message that expired before it was taken in");
            return Ok(Outcome::Dropped);
        }
        if entry.everyone {
            return self.store_spooled_announcement(name, message);
        }
        self.backend.check_space()?;
        if users.len() > THRESHOLD {
            let mut set = Recipients::default();
            for user in &users {
                set.push(user.clone());
            }
            set.seal();
            let value = record::encode_bulk(&message, false, &set);
            {
                let _commit = self.bulks.commit.lock();
                let id = self.backend.next_id()?;
                self.backend
                    .insert_spooled(&[], Some((id, &value)), name.as_bytes())?;
                self.count_recipients(&set, true);
                self.bulks
                    .push(Arc::new(Bulk::new(id, message, false, set)));
            }
            // Durable before the file goes, and before anyone is told.
            self.commit()?;
            self.notifier.everyone();
            return Ok(Outcome::Stored);
        }
        let prefixes = users
            .iter()
            .map(key::user_prefix)
            .collect::<Result<Vec<_>>>()?;
        let id = self.store_spooled_records(name, &message, &prefixes)?;
        self.commit()?;
        if let Some(replace_key) = &message.replace_key {
            // As the engine's own keyed sends do, once the new record is
            // durable: each recipient's older queued records with the key
            // go (they are hidden at read already; a bulk record's copies
            // stay hidden there).
            for prefix in &prefixes {
                self.replace_older(prefix, self.index.slot(prefix), replace_key, id);
            }
        }
        for user in &users {
            self.notifier.user(user);
        }
        Ok(Outcome::Stored)
    }

    /// A spooled announcement to everyone: as the engine's own
    /// `send_everyone` stores one (a bulk record whose set lists the users
    /// who have taken it, none yet; not counted in the index), with the
    /// mark in the same transaction. Durable before the file goes, then
    /// every watcher is woken.
    fn store_spooled_announcement(&self, name: &str, message: Outgoing) -> Result<Outcome> {
        self.backend.check_space()?;
        let takers = Recipients::default();
        let value = record::encode_bulk(&message, true, &takers);
        {
            let _commit = self.bulks.commit.lock();
            let id = self.backend.next_id()?;
            self.backend
                .insert_spooled(&[], Some((id, &value)), name.as_bytes())?;
            self.bulks
                .push(Arc::new(Bulk::new(id, message, true, takers)));
        }
        self.commit()?;
        self.notifier.everyone();
        Ok(Outcome::Stored)
    }

    /// A send to a few users: a record each, with the mark, in one
    /// transaction, under every recipient's lock stripe. Returns its id.
    fn store_spooled_records(
        &self,
        name: &str,
        message: &Outgoing,
        prefixes: &[Vec<u8>],
    ) -> Result<u64> {
        let id = self.backend.next_id()?;
        let value = record::encode_inline(message);
        let records: Vec<(Vec<u8>, Vec<u8>)> = prefixes
            .iter()
            .map(|prefix| (key::message_key(prefix, id), value.clone()))
            .collect();
        let slots: Vec<usize> = prefixes.iter().map(|p| self.index.slot(p)).collect();
        let stripes: BTreeSet<usize> = slots.iter().map(|slot| slot % STRIPES).collect();
        let _locked: Vec<_> = stripes.iter().map(|s| self.stripes[*s].lock()).collect();
        for slot in &slots {
            self.index.add(*slot, 1);
        }
        if let Err(error) = self.backend.insert_spooled(&records, None, name.as_bytes()) {
            for slot in &slots {
                self.index.sub(*slot, 1);
            }
            return Err(error);
        }
        Ok(id)
    }
}
