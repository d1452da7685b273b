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
local function stale(ns, bulks, known, epoch)
  return redis.call('GET', ns .. ':epoch') ~= epoch
    or #redis.call('ZRANGEBYSCORE', bulks, known, '+inf', 'LIMIT', 0, 1) > 0
end
";

/// One message, or one message for a few users under one id.
/// KEYS: ns:id, ns:sent:T, ns:exp, then each recipient's ns:q:u. ARGV: ns,
/// record, expiry time in ms ('' for none), replace key ('' for none), then
/// each recipient's u (in the order of their KEYS). A keyed send removes
/// the recipient's queued (not leased) record with the key, if any.
/// Returns {id, recipients}. A second run with the same token T (a retry
/// after a lost reply) returns the first run's answer and stores nothing.
pub(super) const SEND: &str = r"
local done = redis.call('GET', KEYS[2])
if done then
  local id, n = string.match(done, '^(%d+):(%d+)$')
  return {tonumber(id), tonumber(n)}
end
local ns, record, expires, rkey = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local id = redis.call('INCR', KEYS[1])
local f = string.format('%020d', id)
local n = 0
for i = 4, #KEYS do
  local u = ARGV[i + 1]
  if redis.call('HSETNX', KEYS[i], f, record) == 1 then
    n = n + 1
    if rkey ~= '' then
      local k = ns .. ':k:' .. u
      local old = redis.call('HGET', k, rkey)
      if old and redis.call('HDEL', KEYS[i], old) == 1 then
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
redis.call('SET', KEYS[2], string.format('%d:%d', id, n), 'PX', 10000)
return {id, n}
";

/// A bulk send or an announcement: one record, visible from the moment it
/// is added to ns:bulks, in the same step that gives it its id (so ids of
/// bulk sends are in commit order, which the clients' caches rely on).
/// KEYS: ns:id, ns:bulks, ns:sent:T, ns:exp. ARGV: ns, record, expiry time
/// in ms ('' for none). Returns the id; a retry with the same token T
/// returns the first run's id.
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
  return {{}, {}}
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
return {own, taken}
"
    )
}

/// Commits lease `token`: removes its entries for good, all or none.
/// KEYS: l, ns:done:token. ARGV: ns, token, u, then pairs (F, recipients
/// of bulk send F, or 0 for an own record, or '*' for an announcement,
/// which is never removed here: it stays until it expires). Returns 1
/// (committed, now or by an earlier try) or 0 (expired: nothing removed).
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
for i = 4, #ARGV, 2 do
  local f = ARGV[i]
  local v = redis.call('HGET', KEYS[1], f)
  redis.call('HDEL', KEYS[1], f)
  if string.sub(v, 1, 1) == 'b' then
    local need = tonumber(ARGV[i + 1])
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
redis.call('SET', KEYS[2], '1', 'PX', 10000)
return 1
"
    )
}

/// Releases lease `token`'s entries that it still holds, back into their
/// place, and tells the live watchers. KEYS: q, l. ARGV: ns, u, token,
/// then F... Returns how many entries came back.
pub(super) const RELEASE: &str = r"
local ns, u, token = ARGV[1], ARGV[2], ARGV[3]
local back = 0
for i = 4, #ARGV do
  local f = ARGV[i]
  local v = redis.call('HGET', KEYS[2], f)
  if v and string.sub(v, 2, 21) == token then
    if string.sub(v, 1, 1) == 'd' then
      redis.call('HSET', KEYS[1], f, string.sub(v, 42))
    else
      redis.call('SREM', ns .. ':bt:' .. f, u)
    end
    redis.call('HDEL', KEYS[2], f)
    back = back + 1
  end
end
if back > 0 then redis.call('PUBLISH', ns .. ':live', u) end
return back
";

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
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]), untaken}
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
    if redis.call('EXISTS', q) == 0 then redis.call('DEL', ns .. ':k:' .. u) end
  end
end
return #due
"
    )
}
