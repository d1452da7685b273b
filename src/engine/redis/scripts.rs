//! The Lua scripts: every change to a user's queue is one script, which
//! Redis runs atomically (no other command runs in between, and with AOF
//! the script's writes are logged as one unit).
//!
//! Why scripts and not MULTI/EXEC: a drain must read the queue and then
//! decide what to write (which bulk sends the user has not taken, which
//! leases have expired). MULTI/EXEC cannot branch on what it read, so it
//! would need WATCH and a retry loop that livelocks under contention; a
//! script reads and writes in one step and never retries.
//!
//! Keys, for namespace `ns` and a user's key prefix `u` (binary, as on
//! sled: `0x01 ‖ u64 BE` or `0x02 ‖ len ‖ bytes`); `F` is an id written as
//! 20 decimal digits, so that byte order is id order:
//!
//! ```text
//! ns:id          INCR counter: message ids (shared by all senders)
//! ns:q:u         HASH F -> record            the user's queued messages
//! ns:l:u         HASH F -> kind ‖ token ‖ deadline ‖ [record]
//!                                            leased: kind 'd' (the user's own
//!                                            record follows) or 'b' (bulk send F)
//! ns:k:u         HASH replace key -> F       the newest queued own record with
//!                                            each key (a hint: a send with the
//!                                            key removes F if it is still queued)
//! ns:bulks       ZSET F scored by id        live bulk sends and announcements
//! ns:b:F         STRING bulk record          text + recipient set, stored once
//!                                            (an announcement: "everyone", no set)
//! ns:bt:F        SET of u                    recipients who took or leased it
//! ns:bc:F        counter                     recipients who committed it (not
//!                                            kept for announcements, which stay
//!                                            until they expire)
//! ns:exp         ZSET scored by expiry time  what the reaper removes once due:
//!                                            F ‖ u (own record F of user u) or
//!                                            F (bulk send or announcement F)
//! ns:rk          HASH replace key -> F       the newest keyed announcement per
//!                                            key: once it has expired (also after
//!                                            it was reaped), it still replaces
//!                                            every older message with the key, for
//!                                            every user (kept: one entry per key
//!                                            announcements used)
//! ns:rkmax       STRING                      the newest id in ns:rk (caches older
//!                                            than it are stale)
//! ns:took:u      HASH replace key -> F       keyed announcement F was taken by
//!                                            the user while older messages were
//!                                            queued or leased: its ns:rk mark
//!                                            spares them (dropped once the user's
//!                                            queue and leases are empty)
//! ns:done:T      STRING (expires in 10 s)    lease T was committed (for a retried commit)
//! ns:sent:T      STRING (expires in 10 s)    send T was stored (for a retried send)
//! ns:quarantine  LIST of quarantine entries  records that did not decode
//! ns:epoch       STRING, random              names this data set: a server that
//!                                            lost its data gets a new one, and
//!                                            the clients' caches start again
//! ```
//!
//! Sends, bulk sends, announcements and releases `PUBLISH` to the channel
//! `ns:live` (not a key): the payload is the user's prefix `u`, or `*` for
//! a bulk send or an announcement, for every process's live watchers.
//!
//! Lease deadlines are on Redis's clock (`TIME`), so that they agree across
//! processes and machines. Expiry times are on the clock of the process
//! that judges them (the store's `Clock`): the reaper passes its own time,
//! and reads filter in the client.

/// Shared Lua functions, prepended to the scripts that need them.
const PRELUDE: &str = r"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Puts the user's expired leases back: own records into the queue, bulk
-- sends back to untaken. Committed marks are never here.
local function reclaim(ns, q, l, u, now)
  local all = redis.call('HGETALL', l)
  for i = 1, #all, 2 do
    local f, v = all[i], all[i + 1]
    if tonumber(string.sub(v, 22, 41)) <= now then
      if string.sub(v, 1, 1) == 'd' then
        redis.call('HSET', q, f, string.sub(v, 42))
      else
        redis.call('SREM', ns .. ':bt:' .. f, u)
      end
      redis.call('HDEL', l, f)
    end
  end
end
-- Whether the client's cache of bulk sends is out of date: a newer bulk
-- send exists, or the data set is not the one the cache was read from
-- (the server lost its data, and ids start again).
-- A keyed announcement newer than the cache also makes it stale (after
-- the announcement itself is gone, its key's mark in ns:rk stays).
local function stale(ns, bulks, known, epoch)
  return redis.call('GET', ns .. ':epoch') ~= epoch
    or #redis.call('ZRANGEBYSCORE', bulks, known, '+inf', 'LIMIT', 0, 1) > 0
    or (tonumber(redis.call('GET', ns .. ':rkmax')) or 0)
       > (tonumber(string.sub(known, 2)) or 0)
end
-- Bulk send (or announcement) b was replaced for these users by a newer
-- message with its key: they count as having taken it (and, for a bulk
-- send, as having committed it; need is its recipient count, nil for an
-- announcement). Users who hold it in a lease keep it with the lease.
local function replaced(ns, b, users, need)
  if #users == 0 or redis.call('EXISTS', ns .. ':b:' .. b) == 0 then return end
  local added = redis.call('SADD', ns .. ':bt:' .. b, unpack(users))
  if need and added > 0
     and redis.call('INCRBY', ns .. ':bc:' .. b, added) >= need then
    redis.call('DEL', ns .. ':b:' .. b, ns .. ':bt:' .. b, ns .. ':bc:' .. b)
    redis.call('ZREM', ns .. ':bulks', b)
    redis.call('ZREM', ns .. ':exp', b)
  end
end
";

/// One message, or one message for a few users under one id.
/// KEYS: ns:id, ns:sent:T, ns:exp, ns:bulks, then each recipient's ns:q:u.
/// ARGV: ns, record, expiry time in ms ('' for none), replace key ('' for
/// none), then for a keyed send '(' ‖ the newest bulk id the client knows
/// and the epoch of its cache (both '' for an unkeyed send), then each
/// recipient's u (in the order of their KEYS), then triples (i, F, count):
/// the older bulk send or announcement F with the same key lists recipient
/// i (count as for the commit). A keyed send removes the recipient's
/// queued (not leased) record with the key, if any, and marks those bulk
/// sends taken by the recipient. Returns 'stale' (nothing done: the client
/// does not know every bulk send) or {id, recipients}. A second run with
/// the same token T (a retry after a lost reply) returns the first run's
/// answer and stores nothing.
pub(super) fn send() -> String {
    format!(
        "{PRELUDE}{}",
        r"
local done = redis.call('GET', KEYS[2])
if done then
  local id, n = string.match(done, '^(%d+):(%d+)$')
  return {tonumber(id), tonumber(n)}
end
local ns, record, expires, rkey = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if ARGV[5] ~= '' and stale(ns, KEYS[4], ARGV[5], ARGV[6]) then return 'stale' end
local id = redis.call('INCR', KEYS[1])
local f = string.format('%020d', id)
local users = #KEYS - 4
local stored = {}
local n = 0
for i = 1, users do
  local q, u = KEYS[i + 4], ARGV[i + 6]
  if redis.call('HSETNX', q, f, record) == 1 then
    stored[i] = true
    n = n + 1
    if rkey ~= '' then
      local k = ns .. ':k:' .. u
      local old = redis.call('HGET', k, rkey)
      if old and redis.call('HDEL', q, old) == 1 then
        redis.call('ZREM', KEYS[3], old .. u)
      end
      redis.call('HSET', k, rkey, f)
    end
    if expires ~= '' then
      redis.call('ZADD', KEYS[3], expires, f .. u)
    end
    redis.call('PUBLISH', ns .. ':live', u)
  end
end
for j = users + 7, #ARGV, 3 do
  local i = tonumber(ARGV[j])
  if i and stored[i] then
    replaced(ns, ARGV[j + 1], {ARGV[i + 6]}, tonumber(ARGV[j + 2]))
  end
end
redis.call('SET', KEYS[2], string.format('%d:%d', id, n), 'PX', 10000)
return {id, n}
"
    )
}

/// A bulk send or an announcement: one record, visible from the moment it
/// is added to ns:bulks, in the same step that gives it its id (so ids of
/// bulk sends are in commit order, which the clients' caches rely on).
/// KEYS: ns:id, ns:bulks, ns:sent:T, ns:exp. ARGV: ns, record, expiry time
/// in ms ('' for none), and for a keyed announcement its key ('' else):
/// the key's mark in ns:rk then names it, as the newest announcement with
/// the key. Returns the id; a retry with the same token T returns the
/// first run's id.
pub(super) const BULK: &str = r"
local done = redis.call('GET', KEYS[3])
if done then return tonumber(done) end
local id = redis.call('INCR', KEYS[1])
local f = string.format('%020d', id)
redis.call('SET', ARGV[1] .. ':b:' .. f, ARGV[2])
redis.call('ZADD', KEYS[2], id, f)
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[4], ARGV[3], f)
end
if ARGV[4] ~= '' then
  redis.call('HSET', ARGV[1] .. ':rk', ARGV[4], f)
  redis.call('SET', ARGV[1] .. ':rkmax', id)
end
redis.call('SET', KEYS[3], string.format('%d', id), 'PX', 10000)
redis.call('PUBLISH', ARGV[1] .. ':live', '*')
return id
";

/// Leases the user's queued messages and the bulk sends listed in ARGV
/// that the user has not taken. KEYS: q, l, bulks. ARGV: ns, u, token
/// (20 digits), timeout ms, '(' ‖ newest bulk id the client knows, the
/// epoch the cache was read in, then candidate bulk ids (F). Returns 'stale' (nothing changed but expired
/// leases) or {{F, record, ...}, {F, ...}}.
pub(super) fn lease() -> String {
    format!(
        "{PRELUDE}{}",
        r"
local ns, u, token = ARGV[1], ARGV[2], ARGV[3]
if stale(ns, KEYS[3], ARGV[5], ARGV[6]) then return 'stale' end
-- The common case of an empty queue: nothing to reclaim or take.
if #ARGV < 7 and redis.call('EXISTS', KEYS[1], KEYS[2]) == 0 then
  return {{}, {}, {}}
end
local now = now_ms()
reclaim(ns, KEYS[1], KEYS[2], u, now)
local head = token .. string.format('%020d', now + tonumber(ARGV[4]))
local own = redis.call('HGETALL', KEYS[1])
for i = 1, #own, 2 do
  redis.call('HSET', KEYS[2], own[i], 'd' .. head .. own[i + 1])
end
if #own > 0 then redis.call('DEL', KEYS[1], ns .. ':k:' .. u) end
local taken = {}
for i = 7, #ARGV do
  local f = ARGV[i]
  if redis.call('EXISTS', ns .. ':b:' .. f) == 1
     and redis.call('SADD', ns .. ':bt:' .. f, u) == 1 then
    redis.call('HSET', KEYS[2], f, 'b' .. head)
    taken[#taken + 1] = f
  end
end
return {own, taken, redis.call('HGETALL', ns .. ':took:' .. u)}
"
    )
}

/// Commits lease `token`: removes its entries for good, all or none.
/// KEYS: l, ns:done:token. ARGV: ns, token, u, then pairs (F, recipients
/// of bulk send F, or 0 for an own record, or '*' ‖ its replace key for an
/// announcement, which is never removed here: it stays until it expires).
/// A keyed announcement taken while the user has other messages queued or
/// leased is noted in ns:took:u. Returns 1 (committed, now or by an earlier
/// try) or 0 (expired: nothing removed).
pub(super) fn commit() -> String {
    format!(
        "{PRELUDE}{}",
        r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
local ns, token, u = ARGV[1], ARGV[2], ARGV[3]
local now = now_ms()
for i = 4, #ARGV, 2 do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if not v or string.sub(v, 2, 21) ~= token
     or (tonumber(string.sub(v, 22, 41)) or 0) <= now then
    return 0
  end
end
local keyed = {}
for i = 4, #ARGV, 2 do
  local f = ARGV[i]
  local v = redis.call('HGET', KEYS[1], f)
  redis.call('HDEL', KEYS[1], f)
  if string.sub(v, 1, 1) == 'b' then
    local need = tonumber(ARGV[i + 1])
    local rkey = string.match(ARGV[i + 1], '^%*(.+)$')
    if rkey then keyed[#keyed + 1] = {rkey, f} end
    -- A bulk send the reaper removed meanwhile has no counter to revive.
    if need and redis.call('EXISTS', ns .. ':b:' .. f) == 1 then
      local committed = redis.call('INCR', ns .. ':bc:' .. f)
      if committed >= need then
        redis.call('DEL', ns .. ':b:' .. f, ns .. ':bt:' .. f, ns .. ':bc:' .. f)
        redis.call('ZREM', ns .. ':bulks', f)
        redis.call('ZREM', ns .. ':exp', f)
      end
    end
  else
    redis.call('ZREM', ns .. ':exp', f .. u)
  end
end
local q, took = ns .. ':q:' .. u, ns .. ':took:' .. u
if redis.call('EXISTS', q, KEYS[1]) == 0 then
  redis.call('DEL', took, ns .. ':k:' .. u)
else
  -- Older messages with these keys are still queued or leased: for this
  -- user the announcements no longer replace them (a key is free again
  -- once delivered), also after they expire.
  for _, taken in ipairs(keyed) do
    local before = redis.call('HGET', took, taken[1])
    if not before or before < taken[2] then
      redis.call('HSET', took, taken[1], taken[2])
    end
  end
end
redis.call('SET', KEYS[2], '1', 'PX', 10000)
return 1
"
    )
}

/// Releases lease `token`'s entries that it still holds, back into their
/// place, and tells the live watchers; an entry whose replace key names a
/// newer record still queued (a keyed send while it was leased) is
/// dropped instead, as replaced. KEYS: q, l. ARGV: ns, u, token, then
/// triples (F, replace key or '', count as for the commit). Returns how
/// many entries came back.
pub(super) fn release() -> String {
    format!(
        "{PRELUDE}{}",
        r"
local ns, u, token = ARGV[1], ARGV[2], ARGV[3]
local back = 0
for i = 4, #ARGV, 3 do
  local f, rkey = ARGV[i], ARGV[i + 1]
  local v = redis.call('HGET', KEYS[2], f)
  if v and string.sub(v, 2, 21) == token then
    local newer = rkey ~= '' and redis.call('HGET', ns .. ':k:' .. u, rkey)
    local gone = newer and newer > f and redis.call('HEXISTS', KEYS[1], newer) == 1
    redis.call('HDEL', KEYS[2], f)
    if string.sub(v, 1, 1) == 'd' then
      if gone then
        redis.call('ZREM', ns .. ':exp', f .. u)
      else
        redis.call('HSET', KEYS[1], f, string.sub(v, 42))
        back = back + 1
      end
    elseif gone then
      -- Stays taken, and counts as committed.
      local need = tonumber(ARGV[i + 2])
      if need and redis.call('EXISTS', ns .. ':b:' .. f) == 1
         and redis.call('INCR', ns .. ':bc:' .. f) >= need then
        redis.call('DEL', ns .. ':b:' .. f, ns .. ':bt:' .. f, ns .. ':bc:' .. f)
        redis.call('ZREM', ns .. ':bulks', f)
        redis.call('ZREM', ns .. ':exp', f)
      end
    else
      redis.call('SREM', ns .. ':bt:' .. f, u)
      back = back + 1
    end
  end
end
if back > 0 then redis.call('PUBLISH', ns .. ':live', u) end
return back
"
    )
}

/// Reads without changing anything. KEYS: q, l, bulks. ARGV: ns, u,
/// '(' ‖ newest known bulk id, epoch, then candidate F... Returns 'stale' or
/// {{F, record, ...} queued, {F, entry, ...} leased, {F, ...} untaken bulks}.
pub(super) fn peek() -> String {
    format!(
        "{PRELUDE}{}",
        r"
local ns, u = ARGV[1], ARGV[2]
if stale(ns, KEYS[3], ARGV[3], ARGV[4]) then return 'stale' end
local untaken = {}
for i = 5, #ARGV do
  local f = ARGV[i]
  if redis.call('EXISTS', ns .. ':b:' .. f) == 1
     and redis.call('SISMEMBER', ns .. ':bt:' .. f, u) == 0 then
    untaken[#untaken + 1] = f
  end
end
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]), untaken,
  redis.call('HGETALL', ns .. ':took:' .. u)}
"
    )
}

/// Whether the user may have messages. KEYS: q, l, bulks. ARGV as for
/// peek. Returns 'stale', 1 or 0.
pub(super) fn any() -> String {
    format!(
        "{PRELUDE}{}",
        r"
local ns, u = ARGV[1], ARGV[2]
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 1 end
if stale(ns, KEYS[3], ARGV[3], ARGV[4]) then return 'stale' end
for i = 5, #ARGV do
  local f = ARGV[i]
  if redis.call('EXISTS', ns .. ':b:' .. f) == 1
     and redis.call('SISMEMBER', ns .. ':bt:' .. f, u) == 0 then
    return 1
  end
end
return 0
"
    )
}

/// Moves a record that does not decode aside. KEYS: the hash holding it
/// (or the bulk record's key), ns:quarantine, ns:bulks. ARGV: F (or '' for
/// a bulk record), quarantine entry.
pub(super) const QUARANTINE: &str = r"
if ARGV[1] == '' then
  if redis.call('DEL', KEYS[1]) == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[2])
  end
  redis.call('ZREM', KEYS[3], ARGV[3])
elseif redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
end
return 1
";

/// Removes what has expired by the caller's clock, at most a batch.
/// KEYS: ns:exp, ns:bulks. ARGV: ns, now (ms, the caller's clock), batch
/// size. A queued own record goes; a leased one is left to its lease (and
/// looked at again a second later), unless the lease is past its deadline
/// (its commit would fail): then it goes too. A bulk send or announcement
/// goes with its taken set and counter. Safe to run in several processes
/// at once: each member is handled once, and a second run finds nothing.
/// Returns how many members were due.
pub(super) fn reap() -> String {
    format!(
        "{PRELUDE}{}",
        r"
local ns, now = ARGV[1], tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local clock = nil
for _, m in ipairs(due) do
  local f = string.sub(m, 1, 20)
  if #m <= 20 then
    redis.call('DEL', ns .. ':b:' .. f, ns .. ':bt:' .. f, ns .. ':bc:' .. f)
    redis.call('ZREM', KEYS[2], f)
    redis.call('ZREM', KEYS[1], m)
  else
    local u = string.sub(m, 21)
    local q, l = ns .. ':q:' .. u, ns .. ':l:' .. u
    redis.call('HDEL', q, f)
    local v = redis.call('HGET', l, f)
    local deadline = v and tonumber(string.sub(v, 22, 41))
    if deadline then
      clock = clock or now_ms()
    end
    if deadline and deadline > clock then
      redis.call('ZADD', KEYS[1], now + 1000, m)
    else
      if v then redis.call('HDEL', l, f) end
      redis.call('ZREM', KEYS[1], m)
    end
    if redis.call('EXISTS', q) == 0 then
      redis.call('DEL', ns .. ':k:' .. u)
      if redis.call('EXISTS', l) == 0 then redis.call('DEL', ns .. ':took:' .. u) end
    end
  end
end
return #due
"
    )
}

/// After a keyed bulk send F: removes each listed recipient's queued own
/// record with the key, if it is older than F. KEYS: ns:exp. ARGV: ns,
/// replace key, F, then u...
pub(super) const REPLACE_OWN: &str = r"
local ns, rkey, x = ARGV[1], ARGV[2], ARGV[3]
for i = 4, #ARGV do
  local u = ARGV[i]
  local k = ns .. ':k:' .. u
  local old = redis.call('HGET', k, rkey)
  if old and old < x then
    if redis.call('HDEL', ns .. ':q:' .. u, old) == 1 then
      redis.call('ZREM', KEYS[1], old .. u)
    end
    redis.call('HDEL', k, rkey)
  end
end
return 1
";

/// After a keyed bulk send: marks the older bulk send or announcement F
/// with the key taken by the listed users, its recipients too. ARGV: ns,
/// F, count (as for the commit), then u...
pub(super) fn replace_bulk() -> String {
    format!(
        "{PRELUDE}{}",
        r"
local users = {}
for i = 4, #ARGV do users[#users + 1] = ARGV[i] end
replaced(ARGV[1], ARGV[2], users, tonumber(ARGV[3]))
return 1
"
    )
}
