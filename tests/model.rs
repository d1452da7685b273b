//! Model test: random sequences of sends, bulk sends and announcements (each
//! with or without a replace key and an expiry), drains, peeks, counts,
//! leases (taken, then committed, released or dropped, several at once),
//! clock advances and close/reopen, run against the store and against a
//! plain in-memory reference (`BTreeMap<UserId, Vec<Entry>>` plus the
//! leased messages); after every step both must agree exactly (texts,
//! levels, ids, keys, expiry times, order).
//!
//! The reference keeps every message until it is taken and applies the
//! seam's read rule at each read (`shown` in `src/engine/mod.rs`): a
//! message is hidden once expired, or when a later message in the same
//! read has its key (even an expired one). It never reaps: an engine's
//! background reaper must not change what reads show. An announcement is,
//! for the reference, a send to every user of the model. Each case picks
//! the store's `default_expiry` (none, or 2 s) and runs on a `ManualClock`.
//!
//! Runs on every engine. "Reopen" is a close and reopen on sled, a new
//! handle on the same server and namespace on Redis, and in memory (which
//! cannot outlive its handle) only the drop of the open leases.
//!
//! 256 cases by default (or `PROPTEST_CASES`); 10,000 in the ignored
//! `model_long`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use async_messages::{Durability, Error, Lease, Level, ManualClock, UserId};
use common::engines::{Engine, Fixture, Stores};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Users, including the tricky ones: 0 and `u64::MAX`, `""`, `"a"` next
/// to `"ab"`, a NUL byte, non-ASCII, and `"0"` next to integer 0.
fn users() -> Vec<UserId> {
    vec![
        UserId::Int(0),
        UserId::Int(1),
        UserId::Int(u64::MAX),
        UserId::Int(256),
        UserId::from(""),
        UserId::from("a"),
        UserId::from("ab"),
        UserId::from("a\0b"),
        UserId::from("a\0"),
        UserId::from("émilie"),
        UserId::from("0"),
        UserId::from("日本語"),
    ]
}

fn any_level() -> impl Strategy<Value = Level> {
    prop_oneof![
        Just(Level::Debug),
        Just(Level::Info),
        Just(Level::Success),
        Just(Level::Warning),
        Just(Level::Error),
    ]
}

/// The replace keys a send may carry: few, so that they meet often.
const KEYS: [&str; 2] = ["a", "b"];

/// A send's expiry.
#[derive(Debug, Clone, Copy)]
enum Expiry {
    /// The store's `default_expiry`.
    Default,
    /// `expires_after` this many seconds.
    After(u64),
    /// `never_expires()`.
    Never,
}

/// What a send says beside its text and level.
#[derive(Debug, Clone)]
struct Extras {
    /// An index into [`KEYS`].
    key: Option<usize>,
    expiry: Expiry,
}

#[derive(Debug, Clone)]
enum Op {
    Send(usize, String, Level, Extras),
    /// A bulk send; with `true`, also to [`FILLER`] users outside the
    /// model, so that it is stored as one bulk record (over 256 recipients).
    SendMany(Vec<usize>, String, Level, bool, Extras),
    /// `to_everyone()`.
    Announce(String, Level, Extras),
    /// Move the store's clock forward by this many seconds.
    Advance(u64),
    Get(usize),
    Peek(usize),
    Count(usize),
    /// Take a user's unleased messages in a lease.
    Lease(usize),
    /// Commit, release or drop one of the open leases (by index, modulo
    /// their number; nothing if none is open).
    Commit(usize),
    Release(usize),
    DropLease(usize),
    Reopen,
}

fn any_extras() -> impl Strategy<Value = Extras> {
    let key = prop_oneof![2 => Just(None), 1 => (0..KEYS.len()).prop_map(Some)];
    let expiry = prop_oneof![
        3 => Just(Expiry::Default),
        2 => (1..=3_u64).prop_map(Expiry::After),
        1 => Just(Expiry::Never),
    ];
    (key, expiry).prop_map(|(key, expiry)| Extras { key, expiry })
}

fn any_op() -> impl Strategy<Value = Op> {
    let user = 0..users().len();
    // Mostly ordinary texts; now and then an empty one (refused).
    let text = prop_oneof![9 => "[a-zé \\x00]{1,12}", 1 => Just(String::new())];
    prop_oneof![
        6 => (user.clone(), text.clone(), any_level(), any_extras())
            .prop_map(|(u, t, l, x)| Op::Send(u, t, l, x)),
        2 => (
            proptest::collection::vec(user.clone(), 0..6),
            text.clone(),
            any_level(),
            prop_oneof![2 => Just(false), 1 => Just(true)],
            any_extras(),
        )
            .prop_map(|(u, t, l, big, x)| Op::SendMany(u, t, l, big, x)),
        1 => (text, any_level(), any_extras()).prop_map(|(t, l, x)| Op::Announce(t, l, x)),
        2 => (1..=2_u64).prop_map(Op::Advance),
        3 => user.clone().prop_map(Op::Get),
        2 => user.clone().prop_map(Op::Peek),
        1 => user.clone().prop_map(Op::Count),
        2 => user.prop_map(Op::Lease),
        1 => any::<usize>().prop_map(Op::Commit),
        1 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::DropLease),
        1 => Just(Op::Reopen),
    ]
}

/// Users outside the model added to a big bulk send, to take it over the
/// 256 recipients above which it is stored as one bulk record.
const FILLER: u64 = 300;

/// What a read shows of a message: id, text, level, replace key, expiry
/// time (ms since the Unix epoch).
type Queued = (u64, String, Level, Option<String>, Option<u64>);

/// A message in the reference.
#[derive(Debug, Clone)]
struct Entry {
    id: u64,
    text: String,
    level: Level,
    key: Option<String>,
    expires_at: Option<u64>,
}

impl Entry {
    fn queued(&self) -> Queued {
        (
            self.id,
            self.text.clone(),
            self.level,
            self.key.clone(),
            self.expires_at,
        )
    }
}

/// The seam's read rule over `entries` (in id order) at `now`: not
/// expired, and no later entry with the same key.
fn visible<'a>(entries: impl DoubleEndedIterator<Item = &'a Entry>, now: u64) -> Vec<Queued> {
    let mut keys = HashSet::new();
    let mut shown = Vec::new();
    for entry in entries.rev() {
        let replaced = entry
            .key
            .as_ref()
            .is_some_and(|key| !keys.insert(key.clone()));
        let expired = entry.expires_at.is_some_and(|at| at <= now);
        if !replaced && !expired {
            shown.push(entry.queued());
        }
    }
    shown.reverse();
    shown
}

/// The store's `default_expiry` in a case: none, or 2 s.
fn any_default() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![Just(None), Just(Some(2))]
}

fn open(
    stores: &Stores,
    clock: &ManualClock,
    default: Option<u64>,
) -> async_messages::Result<Fixture> {
    let clock = clock.clone();
    stores.open_with(move |builder| {
        builder
            // Durability is not the point here (the crash loop tests it);
            // a clean close must keep everything anyway.
            .durability(Durability::Periodic(Duration::from_secs(60)))
            .index_slots(64) // small, so that users share slots
            .clock(clock)
            .default_expiry(default.map(Duration::from_secs))
    })
}

fn shown(messages: &[async_messages::Message]) -> Vec<Queued> {
    messages
        .iter()
        .map(|m| {
            (
                m.id().get(),
                m.text().to_owned(),
                m.level(),
                m.replace_key().map(str::to_owned),
                m.expires_at().map(common::clock::ms),
            )
        })
        .collect()
}

/// Sends `draft` with the op's extras applied.
fn with_extras<'a>(draft: async_messages::Draft<'a>, extras: &Extras) -> async_messages::Draft<'a> {
    let draft = match extras.key {
        Some(k) => draft.replace_key(KEYS[k]),
        None => draft,
    };
    match extras.expiry {
        Expiry::Default => draft,
        Expiry::After(secs) => draft.expires_after(Duration::from_secs(secs)),
        Expiry::Never => draft.never_expires(),
    }
}

/// An open lease: the lease, its user, what it showed, and the ids it took
/// (shown or not: its commit removes them all).
type OpenLease = (Lease, UserId, Vec<Queued>, Vec<u64>);

fn run(stores: &Stores, default: Option<u64>, ops: &[Op]) -> Result<(), TestCaseError> {
    let fail = |e: Error| TestCaseError::fail(format!("unexpected error: {e}"));
    let users = users();
    let clock = common::clock::manual_clock();
    let now = || common::clock::ms(async_messages::Clock::now(&clock));
    let mut store = open(stores, &clock, default).map_err(fail)?;
    let mut model: BTreeMap<UserId, Vec<Entry>> = BTreeMap::new();
    // (user, id) pairs hidden by an open lease (a bulk send's id is shared
    // by its recipients), and the open leases.
    let mut leased: HashSet<(UserId, u64)> = HashSet::new();
    let mut leases: Vec<OpenLease> = Vec::new();
    let mut last_id: Option<u64> = None;
    // The entry a send stores, at the clock's time now.
    let entry = |id: u64, text: &str, level: Level, extras: &Extras| {
        let secs = match extras.expiry {
            Expiry::Default => default,
            Expiry::After(secs) => Some(secs),
            Expiry::Never => None,
        };
        Entry {
            id,
            text: text.to_owned(),
            level,
            key: extras.key.map(|k| KEYS[k].to_owned()),
            expires_at: secs.map(|secs| now() + secs * 1000),
        }
    };
    // What a drain or a lease takes: the user's messages not leased.
    let unleased = |model: &BTreeMap<UserId, Vec<Entry>>,
                    leased: &HashSet<(UserId, u64)>,
                    user: &UserId|
     -> Vec<Entry> {
        model
            .get(user)
            .into_iter()
            .flatten()
            .filter(|entry| !leased.contains(&(user.clone(), entry.id)))
            .cloned()
            .collect()
    };
    for op in ops {
        match op {
            Op::Send(u, text, level, extras) => {
                let draft = with_extras(store.compose(text.as_str(), *level), extras);
                let result = draft.to_user(&users[*u]);
                if text.is_empty() {
                    prop_assert!(matches!(result, Err(Error::EmptyMessage)), "{result:?}");
                    continue;
                }
                let id = result.map_err(fail)?;
                if *level < Level::Info {
                    prop_assert_eq!(id, None);
                    continue;
                }
                let id = id
                    .ok_or_else(|| TestCaseError::fail("no id for a stored message"))?
                    .get();
                prop_assert!(
                    last_id.is_none_or(|last| id > last),
                    "ids grow: {id} after {last_id:?}"
                );
                last_id = Some(id);
                let sent = entry(id, text, *level, extras);
                model.entry(users[*u].clone()).or_default().push(sent);
            }
            Op::SendMany(list, text, level, big, extras) => {
                let filler = (0..if *big { FILLER } else { 0 }).map(|k| UserId::Int((1 << 50) + k));
                let draft = with_extras(store.compose(text.as_str(), *level), extras);
                let result = draft.to_users(list.iter().map(|u| users[*u].clone()).chain(filler));
                if text.is_empty() {
                    prop_assert!(matches!(result, Err(Error::EmptyMessage)), "{result:?}");
                    continue;
                }
                let sent = result.map_err(fail)?;
                if *level < Level::Info || (list.is_empty() && !big) {
                    prop_assert_eq!(sent.id(), None);
                    prop_assert_eq!(sent.recipients(), 0);
                    continue;
                }
                // A user listed twice gets the message once and counts once.
                let mut listed = list.clone();
                listed.sort_unstable();
                listed.dedup();
                let filler = if *big { FILLER } else { 0 };
                prop_assert_eq!(sent.recipients(), listed.len() as u64 + filler);
                let id = sent
                    .id()
                    .ok_or_else(|| TestCaseError::fail("no id for a bulk send"))?
                    .get();
                prop_assert!(
                    last_id.is_none_or(|last| id > last),
                    "ids grow: {id} after {last_id:?}"
                );
                last_id = Some(id);
                let sent = entry(id, text, *level, extras);
                for u in listed {
                    model
                        .entry(users[u].clone())
                        .or_default()
                        .push(sent.clone());
                }
            }
            Op::Announce(text, level, extras) => {
                let draft = with_extras(store.compose(text.as_str(), *level), extras);
                let result = draft.to_everyone();
                if text.is_empty() {
                    prop_assert!(matches!(result, Err(Error::EmptyMessage)), "{result:?}");
                    continue;
                }
                if *level < Level::Info {
                    prop_assert!(
                        matches!(result, Err(Error::BelowMinimumLevel { .. })),
                        "{result:?}"
                    );
                    continue;
                }
                let id = result.map_err(fail)?.get();
                prop_assert!(
                    last_id.is_none_or(|last| id > last),
                    "ids grow: {id} after {last_id:?}"
                );
                last_id = Some(id);
                let sent = entry(id, text, *level, extras);
                for user in &users {
                    model.entry(user.clone()).or_default().push(sent.clone());
                }
            }
            Op::Advance(secs) => clock.advance(Duration::from_secs(*secs)),
            Op::Get(u) => {
                let user = &users[*u];
                let got = shown(&store.get_messages(user).map_err(fail)?);
                let want = visible(unleased(&model, &leased, user).iter(), now());
                if let Some(queue) = model.get_mut(user) {
                    queue.retain(|entry| leased.contains(&(user.clone(), entry.id)));
                }
                prop_assert_eq!(got, want, "get_messages({:?})", user);
            }
            Op::Lease(u) => {
                let user = &users[*u];
                let lease = store.lease_messages(user).map_err(fail)?;
                let took = unleased(&model, &leased, user);
                let want = visible(took.iter(), now());
                prop_assert_eq!(
                    shown(lease.messages()),
                    want.clone(),
                    "lease_messages({:?})",
                    user
                );
                let ids: Vec<u64> = took.iter().map(|entry| entry.id).collect();
                leased.extend(ids.iter().map(|id| (user.clone(), *id)));
                leases.push((lease, user.clone(), want, ids));
            }
            Op::Commit(k) | Op::Release(k) | Op::DropLease(k) => {
                if leases.is_empty() {
                    continue;
                }
                let (lease, user, showed, took) = leases.remove(k % leases.len());
                for id in &took {
                    leased.remove(&(user.clone(), *id));
                }
                match op {
                    Op::Commit(_) => {
                        let got = shown(&lease.commit().map_err(fail)?);
                        prop_assert_eq!(got, showed, "commit of a lease of {:?}", &user);
                        if let Some(queue) = model.get_mut(&user) {
                            queue.retain(|entry| !took.contains(&entry.id));
                        }
                    }
                    Op::Release(_) => lease.release(),
                    _ => drop(lease),
                }
            }
            Op::Peek(u) => {
                let user = &users[*u];
                let got = shown(&store.peek(user).map_err(fail)?);
                let want = visible(model.get(user).into_iter().flatten(), now());
                prop_assert_eq!(got, want, "peek({:?})", user);
            }
            Op::Count(u) => {
                let user = &users[*u];
                let got = store.count(user).map_err(fail)?;
                let want = visible(model.get(user).into_iter().flatten(), now()).len();
                prop_assert_eq!(got, want, "count({:?})", user);
            }
            Op::Reopen => {
                // Open leases hold the store: dropped, their messages come
                // back. Reopening right after the drop must work.
                leases.clear();
                leased.clear();
                store.reopen().map_err(fail)?;
            }
        }
    }
    // At the end, after one more reopen, every user holds exactly the model.
    leases.clear();
    store.reopen().map_err(fail)?;
    for user in &users {
        let got = shown(&store.get_messages(user).map_err(fail)?);
        let want = visible(model.remove(user).unwrap_or_default().iter(), now());
        prop_assert_eq!(got, want, "final drain of {:?}", user);
        prop_assert_eq!(store.count(user).map_err(fail)?, 0);
    }
    prop_assert!(store.quarantined().map_err(fail)?.is_empty());
    Ok(())
}

/// Runs `cases` random operation sequences of up to `most_ops` operations
/// on `engine`.
fn check(engine: Engine, cases: u32, most_ops: usize) {
    let stores = engine.stores();
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let case = (
        any_default(),
        proptest::collection::vec(any_op(), 1..most_ops),
    );
    if let Err(failure) =
        TestRunner::new(config).run(&case, |(default, ops)| run(&stores, default, &ops))
    {
        panic!("{failure}");
    }
}

/// The store behaves exactly like the reference (256 cases, or `PROPTEST_CASES`).
fn store_matches_the_reference(engine: Engine) {
    check(engine, Config::default().cases, 40);
}

/// `cargo test --all-features --release --test model -- --ignored model_long`
fn model_long(engine: Engine) {
    check(engine, 10_000, 60);
}

engine_tests! {
    store_matches_the_reference,
    #[ignore = "long run: 10,000 cases"]
    model_long,
}
