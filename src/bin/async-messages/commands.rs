//! One function per command.

use std::io::{BufWriter, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_messages::{Error, Level, Message, MessageStore, UserId};

use crate::json::{self, ExportLine, JsonCheck, JsonMessage, JsonQueue, JsonStats};
use crate::target::Target;
use crate::text::{self, plural, size};
use crate::{Failure, ndjson, write_failure};

/// A damaged record met while reading is quarantined and the read is
/// retried; a queue with more damaged records than this is given up on.
const MAX_DAMAGED_PER_READ: usize = 10_000;

/// Who a `send` goes to.
#[derive(Debug)]
pub(crate) enum To {
    User(UserId),
    /// An announcement.
    Everyone,
}

/// What `send` says beyond the text.
#[derive(Debug)]
pub(crate) struct SendOptions<'a> {
    pub(crate) level: &'a str,
    pub(crate) expires_after: Option<&'a str>,
    pub(crate) replace_key: Option<&'a str>,
}

pub(crate) fn send(
    target: &Target,
    to: &To,
    text: String,
    options: &SendOptions<'_>,
) -> Result<(), Failure> {
    let level: Level = options.level.parse().map_err(|e: Error| e.to_string())?;
    let expires_after = options
        .expires_after
        .map(text::parse_duration)
        .transpose()?;
    // The spool checks everything too, but only after creating the store's
    // directory: refuse first, so that bad input leaves nothing behind. A
    // dry run in memory checks with the store's own rules and errors.
    let dry_run = MessageStore::in_memory();
    let checked = compose(
        dry_run.compose(text.as_str(), level),
        expires_after,
        options.replace_key,
    )
    .to_user(0_u64);
    if let Err(error) = checked {
        return Err(target.failure(error));
    }
    let spool = target.spool()?;
    let mut draft = spool.compose(text, level);
    if let Some(after) = expires_after {
        draft = draft.expires_after(after);
    }
    if let Some(key) = options.replace_key {
        draft = draft.replace_key(key);
    }
    let sent = match to {
        To::User(user) => draft.to_user(user.clone()),
        To::Everyone => draft.to_everyone(),
    };
    sent.map_err(|e| target.failure(e))?;
    let whom = match to {
        To::User(user) => format!("for user {user}"),
        To::Everyone => "for everyone".to_owned(),
    };
    let what = match to {
        To::User(_) => a_message(level),
        To::Everyone => format!("{} announcement", article(level)),
    };
    let mut notes = Vec::new();
    if let Some(after) = expires_after {
        notes.push(format!("expires in {}", humantime::format_duration(after)));
    }
    if let Some(key) = options.replace_key {
        notes.push(format!("replaces a queued message with the key {key:?}"));
    }
    let details = if notes.is_empty() {
        String::new()
    } else {
        format!(" ({})", notes.join("; "))
    };
    match target {
        Target::Dir(path) => say!(
            "Queued {what} {whom}{details} in the spool of the store at {}; the app takes it in at once if it runs, or when it next opens the store.",
            path.display()
        ),
        Target::Redis { .. } if level < Level::Info => {
            say!("Nothing was stored: a debug message is below the store's minimum level, info.")
        }
        Target::Redis { .. } => say!("Queued {what} {whom}{details} in {}.", target.describe()),
    }
    if level < Level::Info && !target.is_redis() {
        eprintln!(
            "note: the app keeps a debug message only if its store's minimum level is debug (the default, info, drops it)"
        );
    }
    Ok(())
}

/// `draft` with an expiry and a replace key, when given.
fn compose<'a>(
    mut draft: async_messages::Draft<'a>,
    expires_after: Option<Duration>,
    replace_key: Option<&str>,
) -> async_messages::Draft<'a> {
    if let Some(after) = expires_after {
        draft = draft.expires_after(after);
    }
    if let Some(key) = replace_key {
        draft = draft.replace_key(key);
    }
    draft
}

pub(crate) fn peek(target: &Target, user: &UserId, as_json: bool) -> Result<(), Failure> {
    let store = target.open_existing()?;
    let messages = read_queue(target, &store, user)?;
    if as_json {
        let queue = JsonQueue {
            user: user.into(),
            messages: messages.iter().map(JsonMessage::from).collect(),
        };
        say!("{}", json::to_line(&queue));
    } else if messages.is_empty() {
        say!("No messages queued for user {user}.");
    } else {
        say!(
            "{} queued for user {user}, oldest first:",
            plural(messages.len() as u64, "message", "messages")
        );
        say!("{}", text::messages(&messages).trim_end_matches('\n'));
    }
    Ok(())
}

pub(crate) fn count(target: &Target, user: &UserId) -> Result<(), Failure> {
    let store = target.open_existing()?;
    say!("{}", read_queue(target, &store, user)?.len());
    Ok(())
}

pub(crate) fn stats(target: &Target, as_json: bool) -> Result<(), Failure> {
    let store = target.open_existing()?;
    let stats = store.stats().map_err(|e| target.failure(e))?;
    if as_json {
        say!("{}", json::to_line(&JsonStats::from(&stats)));
    } else {
        say!("Store:                {}", target.place());
        say!("Users with messages:  {}", stats.users);
        say!("Messages:             {}", stats.messages);
        say!("Bulk records:         {}", stats.bulk_records);
        say!("Size on disk:         {}", size(stats.size_on_disk));
        say!("Quarantined records:  {}", stats.quarantined);
    }
    Ok(())
}

pub(crate) fn export(target: &Target) -> Result<(), Failure> {
    let store = target.open_existing()?;
    let users = store.users().map_err(|e| target.failure(e))?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    let (mut messages, mut with_messages) = (0_u64, 0_u64);
    for user in &users {
        let queue = read_queue(target, &store, user)?;
        if !queue.is_empty() {
            with_messages += 1;
        }
        for message in &queue {
            let line = ExportLine {
                id: message.id().get(),
                user: user.into(),
                level: message.level().as_str(),
                text: message.text(),
                sent_at_ms: json::sent_at_ms(message),
                expires_at_ms: json::expires_at_ms(message),
                replace_key: message.replace_key(),
            };
            writeln!(out, "{}", json::to_line(&line)).map_err(write_failure)?;
            messages += 1;
        }
    }
    out.flush().map_err(write_failure)?;
    eprintln!(
        "Exported {} of {} from {}.",
        plural(messages, "message", "messages"),
        plural(with_messages, "user", "users"),
        target.describe()
    );
    Ok(())
}

pub(crate) fn import(target: &Target) -> Result<(), Failure> {
    let (sends, lines) = ndjson::read(std::io::stdin().lock())?;
    if sends.is_empty() {
        say!("Nothing to import: stdin held no messages; the store was not touched.");
        return Ok(());
    }
    let store = target.open_or_create()?;
    let mut users = std::collections::HashSet::new();
    let mut stored = 0_u64;
    let mut expired = 0_u64;
    let mut imported = 0_u64;
    for send in &sends {
        let draft = store.compose(send.text.as_str(), send.level);
        let draft = match send.replace_key.as_deref() {
            Some(key) => draft.replace_key(key),
            None => draft,
        };
        // Each message keeps its expiry time, not its duration.
        let draft = match send.expires_at_ms {
            None => draft.never_expires(),
            Some(at) => match at.checked_sub(ndjson::now_ms()).filter(|left| *left > 0) {
                Some(left) => draft.expires_after(Duration::from_millis(left)),
                None => {
                    expired += send.users.len() as u64;
                    continue;
                }
            },
        };
        if let Err(error) = draft.to_users(send.users.iter()) {
            // Make what was stored durable before saying it was.
            let _ = store.flush();
            let Failure::Said(why) = target.failure(error) else {
                return Err(Failure::Quiet);
            };
            return Err(format!(
                "the import stopped at the send with id {} (line {}): {why}; the {} before it ({}) were stored, the rest were not",
                send.id,
                send.line,
                plural(imported, "send", "sends"),
                plural(stored, "message", "messages"),
            )
            .into());
        }
        stored += send.users.len() as u64;
        imported += 1;
        users.extend(send.users.iter());
    }
    // The store was opened with periodic durability: one flush (and
    // fsync) for the whole import instead of one per send.
    store.flush().map_err(|e| target.failure(e))?;
    say!(
        "Imported {} ({}, from {}) for {} into {}; they have new ids and send times.",
        plural(stored, "message", "messages"),
        plural(imported, "send", "sends"),
        plural(lines, "line", "lines"),
        plural(users.len() as u64, "user", "users"),
        target.describe()
    );
    if expired > 0 {
        eprintln!(
            "note: {} had expired by now and {} skipped",
            plural(expired, "message", "messages"),
            if expired == 1 { "was" } else { "were" }
        );
    }
    Ok(())
}

pub(crate) fn purge(target: &Target, user: &UserId) -> Result<(), Failure> {
    let store = target.open_existing()?;
    let mut removed = 0;
    let mut damaged = 0;
    loop {
        match store.get_messages(user) {
            Ok(messages) => {
                removed += messages.len();
                break;
            }
            Err(Error::Corrupt { .. }) if damaged < MAX_DAMAGED_PER_READ => damaged += 1,
            Err(error) => return Err(target.failure(error)),
        }
    }
    say!(
        "Removed {} queued for user {user}.",
        plural(removed as u64, "message", "messages")
    );
    if damaged > 0 {
        eprintln!(
            "warning: {} of user {user} could not be read and were moved to quarantine (see `async-messages check`)",
            plural(damaged as u64, "damaged record", "damaged records")
        );
    }
    Ok(())
}

pub(crate) fn check(target: &Target, as_json: bool) -> Result<(), Failure> {
    let started_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    // Opening quarantines records with a damaged key; `stats` reads every
    // user's queue, quarantining each damaged record it meets and going on.
    let store = target.open_existing()?;
    let stats = store.stats().map_err(|e| target.failure(e))?;
    let quarantined = store.quarantined().map_err(|e| target.failure(e))?;
    let (now, before): (Vec<_>, Vec<_>) = quarantined
        .iter()
        .partition(|record| record.quarantined_at_ms() >= started_ms);
    if as_json {
        let report = JsonCheck {
            users: stats.users,
            messages: stats.messages,
            bulk_records: stats.bulk_records,
            size_on_disk: stats.size_on_disk,
            quarantined_now: now.iter().map(|r| (*r).into()).collect(),
            quarantined_before: before.iter().map(|r| (*r).into()).collect(),
        };
        say!("{}", json::to_line(&report));
        return Ok(());
    }
    say!(
        "Checked {}: {} with {}, {}, {} on disk.",
        target.describe(),
        plural(stats.users, "user", "users"),
        plural(stats.messages, "message", "messages"),
        plural(stats.bulk_records, "bulk record", "bulk records"),
        size(stats.size_on_disk)
    );
    let list = |records: &[&async_messages::QuarantinedRecord]| -> Result<(), Failure> {
        for record in records {
            say!(
                "  {} {}, at {}: {}",
                record.tree(),
                text::short_key(record.key()),
                text::utc(record.quarantined_at_ms()),
                record.reason()
            );
        }
        Ok(())
    };
    if now.is_empty() {
        say!("No damage found: every record could be read.");
    } else {
        say!(
            "Damage found: {} could not be read and {} moved to quarantine (the other messages are kept):",
            plural(now.len() as u64, "record", "records"),
            if now.len() == 1 { "was" } else { "were" }
        );
        list(&now)?;
    }
    if before.is_empty() {
        say!("Quarantined before this check: none.");
    } else {
        say!(
            "Quarantined before this check: {}:",
            plural(before.len() as u64, "record", "records")
        );
        list(&before)?;
    }
    Ok(())
}

/// "an info message", "a success message".
fn a_message(level: Level) -> String {
    format!("{} message", article(level))
}

/// "an info", "a success".
fn article(level: Level) -> String {
    let article = match level {
        Level::Info | Level::Error => "an",
        _ => "a",
    };
    format!("{article} {level}")
}

/// A user's queue, without removing it. A damaged record is moved to
/// quarantine by the store; the read is then retried, with a warning.
fn read_queue(
    target: &Target,
    store: &MessageStore,
    user: &UserId,
) -> Result<Vec<Message>, Failure> {
    let mut damaged = 0;
    loop {
        match store.peek(user) {
            Ok(messages) => return Ok(messages),
            Err(Error::Corrupt { what, reason }) if damaged < MAX_DAMAGED_PER_READ => {
                damaged += 1;
                eprintln!(
                    "warning: a damaged record {what} could not be read ({reason}); it was moved to quarantine and is left out (see `async-messages check`)"
                );
            }
            Err(error) => return Err(target.failure(error)),
        }
    }
}
