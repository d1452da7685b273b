//! Model test: random sequences of sends, bulk sends, drains, peeks, counts,
//! leases (taken, then committed, released or dropped, several at once) and
//! close/reopen, run against the store and against a plain in-memory
//! reference (`BTreeMap<UserId, VecDeque<..>>` plus the leased messages); after
//! every step both must agree exactly (texts, levels, ids, order).
//!
//! Runs on every engine. "Reopen" is a close and reopen on sled, a new
//! handle on the same server and namespace on Redis, and in memory (which
//! cannot outlive its handle) only the drop of the open leases.
//!
//! 256 cases by default (or `PROPTEST_CASES`); 10,000 in the ignored
//! `model_long`.

mod common;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use async_messages::{Durability, Error, Lease, Level, UserId};
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

#[derive(Debug, Clone)]
enum Op {
    Send(usize, String, Level),
    /// A bulk send; with `true`, also to [`FILLER`] users outside the
    /// model, so that it is stored as one bulk record (over 256 recipients).
    SendMany(Vec<usize>, String, Level, bool),
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

fn any_op() -> impl Strategy<Value = Op> {
    let user = 0..users().len();
    // Mostly ordinary texts; now and then an empty one (refused).
    let text = prop_oneof![9 => "[a-zé \\x00]{1,12}", 1 => Just(String::new())];
    prop_oneof![
        6 => (user.clone(), text.clone(), any_level()).prop_map(|(u, t, l)| Op::Send(u, t, l)),
        2 => (
            proptest::collection::vec(user.clone(), 0..6),
            text,
            any_level(),
            prop_oneof![2 => Just(false), 1 => Just(true)]
        )
            .prop_map(|(u, t, l, big)| Op::SendMany(u, t, l, big)),
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

/// What the reference holds for each message: id, text, level.
type Queued = (u64, String, Level);

fn open(stores: &Stores) -> async_messages::Result<Fixture> {
    stores.open_with(|builder| {
        builder
            // Durability is not the point here (the crash loop tests it);
            // a clean close must keep everything anyway.
            .durability(Durability::Periodic(Duration::from_secs(60)))
            .index_slots(64) // small, so that users share slots
    })
}

fn shown(messages: &[async_messages::Message]) -> Vec<Queued> {
    messages
        .iter()
        .map(|m| (m.id().get(), m.text().to_owned(), m.level()))
        .collect()
}

fn run(stores: &Stores, ops: &[Op]) -> Result<(), TestCaseError> {
    let fail = |e: Error| TestCaseError::fail(format!("unexpected error: {e}"));
    let users = users();
    let mut store = open(stores).map_err(fail)?;
    let mut model: BTreeMap<UserId, VecDeque<Queued>> = BTreeMap::new();
    // (user, id) pairs hidden by an open lease (a bulk send's id is shared
    // by its recipients), and the open leases with what each took.
    let mut leased: HashSet<(UserId, u64)> = HashSet::new();
    let mut leases: Vec<(Lease, UserId, Vec<Queued>)> = Vec::new();
    let mut last_id: Option<u64> = None;
    // What a drain or a lease takes: the user's messages not leased.
    let unleased = |model: &BTreeMap<UserId, VecDeque<Queued>>,
                    leased: &HashSet<(UserId, u64)>,
                    user: &UserId|
     -> Vec<Queued> {
        model
            .get(user)
            .into_iter()
            .flatten()
            .filter(|(id, _, _)| !leased.contains(&(user.clone(), *id)))
            .cloned()
            .collect()
    };
    for op in ops {
        match op {
            Op::Send(u, text, level) => {
                let result = store.message_user(&users[*u], text.as_str(), *level);
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
                model
                    .entry(users[*u].clone())
                    .or_default()
                    .push_back((id, text.clone(), *level));
            }
            Op::SendMany(list, text, level, big) => {
                let filler = (0..if *big { FILLER } else { 0 }).map(|k| UserId::Int((1 << 50) + k));
                let result = store.message_users(
                    list.iter().map(|u| users[*u].clone()).chain(filler),
                    text.as_str(),
                    *level,
                );
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
                let mut distinct = list.clone();
                distinct.sort_unstable();
                distinct.dedup();
                for u in distinct {
                    model.entry(users[u].clone()).or_default().push_back((
                        id,
                        text.clone(),
                        *level,
                    ));
                }
            }
            Op::Get(u) => {
                let got = shown(&store.get_messages(&users[*u]).map_err(fail)?);
                let want = unleased(&model, &leased, &users[*u]);
                if let Some(queue) = model.get_mut(&users[*u]) {
                    queue.retain(|(id, _, _)| leased.contains(&(users[*u].clone(), *id)));
                }
                prop_assert_eq!(got, want, "get_messages({:?})", &users[*u]);
            }
            Op::Lease(u) => {
                let lease = store.lease_messages(&users[*u]).map_err(fail)?;
                let want = unleased(&model, &leased, &users[*u]);
                prop_assert_eq!(
                    shown(lease.messages()),
                    want.clone(),
                    "lease_messages({:?})",
                    &users[*u]
                );
                leased.extend(want.iter().map(|(id, _, _)| (users[*u].clone(), *id)));
                leases.push((lease, users[*u].clone(), want));
            }
            Op::Commit(k) | Op::Release(k) | Op::DropLease(k) => {
                if leases.is_empty() {
                    continue;
                }
                let (lease, user, took) = leases.remove(k % leases.len());
                for (id, _, _) in &took {
                    leased.remove(&(user.clone(), *id));
                }
                match op {
                    Op::Commit(_) => {
                        let got = shown(&lease.commit().map_err(fail)?);
                        prop_assert_eq!(got, took.clone(), "commit of a lease of {:?}", &user);
                        if let Some(queue) = model.get_mut(&user) {
                            queue.retain(|queued| !took.contains(queued));
                        }
                    }
                    Op::Release(_) => lease.release(),
                    _ => drop(lease),
                }
            }
            Op::Peek(u) => {
                let got = shown(&store.peek(&users[*u]).map_err(fail)?);
                let want: Vec<Queued> = model.get(&users[*u]).cloned().unwrap_or_default().into();
                prop_assert_eq!(got, want, "peek({:?})", &users[*u]);
            }
            Op::Count(u) => {
                let got = store.count(&users[*u]).map_err(fail)?;
                prop_assert_eq!(
                    got,
                    model.get(&users[*u]).map_or(0, VecDeque::len),
                    "count({:?})",
                    &users[*u]
                );
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
        let want: Vec<Queued> = model.remove(user).unwrap_or_default().into();
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
    let ops = proptest::collection::vec(any_op(), 1..most_ops);
    if let Err(failure) = TestRunner::new(config).run(&ops, |ops| run(&stores, &ops)) {
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
