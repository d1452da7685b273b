//! Announcements (`Draft::to_everyone`, issue 12), on every engine: every
//! user who reads gets one once, users never seen before included, in send
//! order with their other messages; under concurrent drains too; it is
//! stored once; a reopen delivers it to no one twice; a level below the
//! minimum is refused; anonymous requests get nothing.

mod common;

use std::collections::HashMap;
use std::sync::Barrier;
use std::thread;

use async_messages::{
    DeliveryMode, Error, Level, MessageId, MessageStore, RequestHook, RequestKind, Result, UserId,
};
use common::engines::Engine;
use common::{Rng, texts};

/// More recipients than a send to a few users: one bulk record.
const MANY: u64 = 300;

fn announce(store: &MessageStore, text: &str) -> Result<MessageId> {
    store.compose(text, Level::Warning).to_everyone()
}

fn ids(messages: &[async_messages::Message]) -> Vec<MessageId> {
    messages.iter().map(|m| m.id()).collect()
}

/// Users the store has never seen (integer and string ids) each get the
/// announcement once, with its id, text and level, through a drain or a
/// lease; a released or dropped lease gives it back, once; while it is
/// untaken, `may_have_messages` says so.
fn a_user_never_seen_before_gets_it_once(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    store.info(1_u64, "someone else's")?;
    let id = announce(&store, "maintenance tonight")?;
    for user in [UserId::from(12_345_u64), UserId::from("newcomer")] {
        assert!(store.may_have_messages(&user), "{user:?}");
        let peeked = store.peek(&user)?;
        assert_eq!(texts(&peeked), ["maintenance tonight"], "{user:?}");
        assert_eq!(peeked[0].id(), id);
        assert_eq!(peeked[0].level(), Level::Warning);
        assert_eq!(peeked[0].expires_at(), None);
        assert_eq!(store.count(&user)?, 1);
        assert_eq!(store.get_messages(&user)?, peeked, "{user:?}");
        assert!(store.get_messages(&user)?.is_empty(), "once: {user:?}");
        assert!(store.peek(&user)?.is_empty(), "{user:?}");
    }
    // Through leases: taken, released, dropped, then committed.
    let lease = store.lease_messages("leaser")?;
    assert_eq!(texts(lease.messages()), ["maintenance tonight"]);
    assert!(
        store.get_messages("leaser")?.is_empty(),
        "hidden while leased"
    );
    lease.release();
    let lease = store.lease_messages("leaser")?;
    assert_eq!(ids(lease.messages()), [id]);
    drop(lease);
    let lease = store.lease_messages("leaser")?;
    assert_eq!(texts(&lease.commit()?), ["maintenance tonight"]);
    assert!(store.get_messages("leaser")?.is_empty());
    assert!(store.lease_messages("leaser")?.messages().is_empty());
    assert_eq!(
        texts(&store.get_messages(1_u64)?),
        ["someone else's", "maintenance tonight"]
    );
    Ok(())
}

/// An announcement takes its place by id among each user's other
/// messages: own sends, sends to a few, bulk records, other announcements.
fn it_comes_in_send_order_with_the_users_other_messages(engine: Engine) -> Result<()> {
    let store = engine.open_fast()?;
    let a = store.info(1_u64, "a")?.expect("stored");
    let b = store
        .message_users([1_u64, 2], "b", Level::Info)?
        .id()
        .expect("sent");
    let c = announce(&store, "c")?;
    let d = store
        .message_users(0..MANY, "d", Level::Info)?
        .id()
        .expect("sent");
    let e = store.info(1_u64, "e")?.expect("stored");
    let f = announce(&store, "f")?;
    let g = store.info(2_u64, "g")?.expect("stored");
    assert!(a < b && b < c && c < d && d < e && e < f && f < g);
    let got = store.get_messages(1_u64)?;
    assert_eq!(texts(&got), ["a", "b", "c", "d", "e", "f"]);
    assert_eq!(ids(&got), [a, b, c, d, e, f]);
    assert_eq!(texts(&store.peek(2_u64)?), ["b", "c", "d", "f", "g"]);
    assert_eq!(
        texts(&store.get_messages(2_u64)?),
        ["b", "c", "d", "f", "g"]
    );
    assert_eq!(texts(&store.get_messages(3_u64)?), ["c", "d", "f"]);
    assert_eq!(texts(&store.get_messages("newcomer")?), ["c", "f"]);
    // A user who read between the two announcements.
    let h = store.info(4_u64, "h")?.expect("stored");
    let i = announce(&store, "i")?;
    assert!(h < i);
    assert_eq!(
        texts(&store.get_messages(4_u64)?),
        ["c", "d", "f", "h", "i"]
    );
    assert_eq!(texts(&store.get_messages(1_u64)?), ["i"]);
    Ok(())
}

/// Four threads drain the same 300 users (integer and string ids) in
/// different orders, with `get_messages` and with leases they commit or
/// release, while a fifth sends a third announcement: every user gets each
/// of the three exactly once, in order.
fn many_users_draining_at_once_each_get_it_once(engine: Engine) -> Result<()> {
    const THREADS: u64 = 4;
    let store = engine.open_fast()?;
    let users: Vec<UserId> = (0..150_u64)
        .map(UserId::from)
        .chain((0..150).map(|n| UserId::from(format!("user {n}"))))
        .collect();
    let first = announce(&store, "first")?;
    let second = announce(&store, "second")?;
    let start = Barrier::new(THREADS as usize + 1);
    let (got, third) = thread::scope(|scope| -> Result<_> {
        let drainers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (store, users, start) = (&store, &users, &start);
                scope.spawn(move || -> Result<Vec<(UserId, Vec<MessageId>)>> {
                    let mut rng = Rng::new(t + 1);
                    let order = rng.some_of(users.len(), users.len() as u64);
                    let mut got = Vec::new();
                    start.wait();
                    for (n, k) in order.into_iter().enumerate() {
                        let user = &users[k];
                        let messages = match n % 3 {
                            0 => store.get_messages(user)?,
                            1 => store.lease_messages(user)?.commit()?,
                            _ => {
                                store.lease_messages(user)?.release();
                                store.get_messages(user)?
                            }
                        };
                        got.push((user.clone(), ids(&messages)));
                    }
                    Ok(got)
                })
            })
            .collect();
        let sender = {
            let (store, start) = (&store, &start);
            scope.spawn(move || -> Result<MessageId> {
                start.wait();
                thread::yield_now();
                announce(store, "third")
            })
        };
        let third = sender.join().expect("sender panicked")?;
        let mut got = Vec::new();
        for drainer in drainers {
            got.extend(drainer.join().expect("drainer panicked")?);
        }
        Ok((got, third))
    })?;
    let mut per_user: HashMap<UserId, Vec<MessageId>> = HashMap::new();
    for (user, messages) in got {
        assert!(
            messages.is_sorted(),
            "one drain of {user:?} is out of order: {messages:?}"
        );
        per_user.entry(user).or_default().extend(messages);
    }
    for user in &users {
        // Drains by different threads: their order is not known here.
        let mut all = per_user.remove(user).unwrap_or_default();
        all.extend(ids(&store.get_messages(user)?));
        all.sort_unstable();
        assert_eq!(all, [first, second, third], "user {user:?}");
    }
    Ok(())
}

/// However many users read it, an announcement is one stored record:
/// `stats().bulk_records` goes up by at most one at the send and does not
/// grow as users take it (the memory engine reports no bulk records).
fn reading_it_does_not_store_it_again(engine: Engine) -> Result<()> {
    let store = engine.open_fast()?;
    let before = store.stats()?.bulk_records;
    announce(&store, "once")?;
    let sent = store.stats()?.bulk_records;
    assert!(sent <= before + 1, "{before} -> {sent}");
    for user in 0..500_u64 {
        match user % 3 {
            0 => assert_eq!(texts(&store.get_messages(user)?), ["once"]),
            1 => assert_eq!(texts(&store.peek(user)?), ["once"]),
            _ => drop(store.lease_messages(user)?.commit()?),
        }
    }
    assert_eq!(store.stats()?.bulk_records, sent);
    Ok(())
}

/// A text no other record holds.
const MARKER: &str = "announcement 3f1c9a7e stored once";

/// sled and Redis: the announcement's text is stored once, also after 400
/// users took, peeked at or leased it: among all stored values, one holds
/// it (sled: every tree of the closed database; Redis: every key of the
/// server). The memory engine shares one copy by reference, which the
/// public API cannot show.
fn its_text_is_stored_once(engine: Engine) -> Result<()> {
    let mut store = engine.open_fast()?;
    let text = format!("{MARKER} {}", "x".repeat(4096));
    store.compose(text.as_str(), Level::Info).to_everyone()?;
    for user in 0..400_u64 {
        match user % 4 {
            0 => assert_eq!(texts(&store.get_messages(user)?), [text.as_str()]),
            1 => assert_eq!(texts(&store.peek(user)?), [text.as_str()]),
            2 => drop(store.lease_messages(user)?.commit()?),
            _ => store.lease_messages(user)?.release(),
        }
    }
    store.flush()?;
    let copies = match engine {
        Engine::Sled => {
            let path = store.path().to_path_buf();
            store.close();
            let copies = {
                let db = common::raw_db(&path);
                let mut copies = 0;
                for name in db.tree_names() {
                    let tree = db.open_tree(&name).expect("tree");
                    for entry in tree.iter() {
                        let (_, value) = entry.expect("entry");
                        if contains(&value, MARKER.as_bytes()) {
                            copies += 1;
                        }
                    }
                }
                copies
            };
            store.reopen()?;
            copies
        }
        Engine::Redis => {
            let server = store.server().expect("a Redis fixture has a server");
            let reply = server.command(&["EVAL", COUNT_COPIES, "0", MARKER]);
            reply
                .strip_prefix(':')
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("EVAL answered {reply:?}"))
        }
        Engine::Memory => unreachable!("not run in memory"),
    };
    assert_eq!(copies, 1, "stored values holding the announcement's text");
    assert_eq!(texts(&store.get_messages("newcomer")?), [text.as_str()]);
    assert_eq!(texts(&store.get_messages(1_u64)?), [text.as_str()]);
    assert!(store.get_messages(0_u64)?.is_empty());
    Ok(())
}

/// Counts the values (and hash fields, set and sorted set members) of all
/// the server's keys that contain `ARGV[1]`.
const COUNT_COPIES: &str = r#"
local count = 0
local cursor = "0"
repeat
  local page = redis.call("SCAN", cursor, "COUNT", 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    local kind = redis.call("TYPE", key)["ok"]
    local values = {}
    if kind == "string" then values = {redis.call("GET", key)}
    elseif kind == "hash" then values = redis.call("HGETALL", key)
    elseif kind == "list" then values = redis.call("LRANGE", key, 0, -1)
    elseif kind == "set" then values = redis.call("SMEMBERS", key)
    elseif kind == "zset" then values = redis.call("ZRANGE", key, 0, -1)
    end
    for _, value in ipairs(values) do
      if string.find(value, ARGV[1], 1, true) then count = count + 1 end
    end
  end
until cursor == "0"
return count
"#;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Reopening the store (sled: the same directory; Redis: a new handle on
/// the same namespace; memory: the same store) changes nothing: users who
/// took the announcement (drained, or leased and committed) do not get it
/// again; users who had not (peeked, or leased without committing) and
/// users never seen get it once.
fn a_reopen_delivers_it_to_no_one_twice(engine: Engine) -> Result<()> {
    let mut store = engine.open()?;
    store.info(5_u64, "own")?;
    let id = announce(&store, "maintenance tonight")?;
    assert_eq!(texts(&store.get_messages(1_u64)?), ["maintenance tonight"]);
    assert_eq!(ids(&store.lease_messages(2_u64)?.commit()?), [id]);
    let leased = store.lease_messages(3_u64)?;
    assert_eq!(ids(leased.messages()), [id]);
    drop(leased);
    assert_eq!(ids(&store.peek(4_u64)?), [id]);
    store.reopen()?;
    assert!(store.get_messages(1_u64)?.is_empty());
    assert!(store.get_messages(2_u64)?.is_empty());
    for user in [3_u64, 4, 6] {
        assert_eq!(ids(&store.get_messages(user)?), [id], "user {user}");
    }
    assert_eq!(
        texts(&store.get_messages(5_u64)?),
        ["own", "maintenance tonight"]
    );
    store.reopen()?;
    for user in 1..=6_u64 {
        assert!(store.get_messages(user)?.is_empty(), "user {user}");
    }
    assert_eq!(ids(&store.get_messages("newcomer")?), [id]);
    Ok(())
}

/// An announcement below the store's minimum level would reach no one: it
/// is refused with `Error::BelowMinimumLevel` (a sentence naming both
/// levels), and nothing is stored.
fn below_the_minimum_level_is_refused(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    let error = store
        .compose("noise", Level::Debug)
        .to_everyone()
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::BelowMinimumLevel {
                level: Level::Debug,
                minimum: Level::Info
            }
        ),
        "{error:?}"
    );
    let sentence = error.to_string();
    assert!(
        sentence.contains("below this store's minimum level")
            && sentence.contains("nothing was stored"),
        "{sentence}"
    );
    assert!(store.peek("newcomer")?.is_empty());
    assert!(store.get_messages(1_u64)?.is_empty());

    let strict = engine.open_with(|builder| builder.min_level(Level::Warning))?;
    let error = strict
        .compose("fyi", Level::Info)
        .to_everyone()
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::BelowMinimumLevel {
                level: Level::Info,
                minimum: Level::Warning
            }
        ),
        "{error:?}"
    );
    announce(&strict, "at the minimum")?;
    assert_eq!(texts(&strict.get_messages("newcomer")?), ["at the minimum"]);
    Ok(())
}

fn page() -> RequestKind<'static> {
    RequestKind::new("GET")
        .header("Accept", "text/html")
        .header("Sec-Fetch-Mode", "navigate")
}

/// Anonymous requests (the hook's user is `None`) get nothing and take
/// nothing, in both delivery modes; a user who logs in afterwards gets it.
/// `may_deliver` is false for anonymous requests and true for a user never
/// seen while the announcement waits for them (a layer that skips the
/// store on `false` would otherwise never show it).
fn anonymous_requests_get_nothing(engine: Engine) -> Result<()> {
    let store = engine.open()?;
    announce(&store, "maintenance tonight")?;
    for mode in [DeliveryMode::AtMostOnce, DeliveryMode::AtLeastOnce] {
        let hook = RequestHook::new(store.clone()).mode(mode);
        assert!(!hook.may_deliver(None, &page()), "{mode:?}");
        let delivery = hook.on_request(None, &page());
        assert!(delivery.is_empty(), "{mode:?}");
        assert!(!delivery.is_leased(), "{mode:?}");
        delivery.finish(200);
    }
    let hook = RequestHook::new(store.clone()).mode(DeliveryMode::AtLeastOnce);
    let user = UserId::from("logged in later");
    assert!(hook.may_deliver(Some(&user), &page()));
    let delivery = hook.on_request(Some(user.clone()), &page());
    assert_eq!(texts(delivery.messages()), ["maintenance tonight"]);
    delivery.finish(200);
    assert!(hook.on_request(Some(user), &page()).is_empty());
    Ok(())
}

engine_tests! {
    a_user_never_seen_before_gets_it_once,
    it_comes_in_send_order_with_the_users_other_messages,
    many_users_draining_at_once_each_get_it_once,
    reading_it_does_not_store_it_again,
    its_text_is_stored_once: Sled | Redis,
    a_reopen_delivers_it_to_no_one_twice,
    below_the_minimum_level_is_refused,
    anonymous_requests_get_nothing,
}
