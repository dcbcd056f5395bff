-- Not a script of its own: put in front of the scripts that read or
-- delete sessions (scripts/__init__.py says which).
--
-- A session is per (user, device): its record is the user's key
-- 'session' .. ':' .. device, and the user's devices are its set
-- 'sessions' (keys.lua; a device whose record expired is dropped from it
-- when read).  The set lives at least as long as each of its records
-- (extend_ttl).

local function session_key(prefix, uid, device)
  return user_key(prefix, 'session', uid) .. ':' .. device
end

-- The user id and device of an entry of a server's set of sessions
-- ("<user id>:<device>"; a bare user id, written by an earlier release,
-- names device "").
local function server_entry(member)
  local uid, device = string.match(member, '^(%d+):(.*)$')
  if not uid then return member, '' end
  return uid, device
end

local function devices_key(prefix, uid)
  return user_key(prefix, 'sessions', uid)
end

-- The user's session generation (a counter that never expires; missing:
-- 0): every script that adds, connects, moves or deletes one of the
-- user's sessions raises it (touch), so that an IM server may keep where
-- the user's sessions are for as long as the generation an append reads
-- is the one it looked them up at (cim.delivery's session cache).  A
-- record that expires does not raise it: a server's copy then holds a
-- session more than the store, which only costs a push that finds the
-- device gone.
local function generation_key(prefix, uid)
  return user_key(prefix, 'sgen', uid)
end

local function touch(prefix, uid)
  redis.call('INCR', generation_key(prefix, uid))
end

-- Give key at least ttl ms to live (never shorten it).
local function extend_ttl(key, ttl)
  if redis.call('PTTL', key) < tonumber(ttl) then
    redis.call('PEXPIRE', key, ttl)
  end
end

-- Mark a session connected (its record key; active, in seconds), living
-- ttl ms unless its server renews it, its user's devices (devices_key) at
-- least as long, and user uid online under name (online_key); raise the
-- user's session generation (its key: generation).
local function activate(key, devices, online_key, uid, name, ttl, active,
                        generation)
  redis.call('HSET', key, 'connected', '1', 'active', active)
  redis.call('INCR', generation)
  redis.call('PEXPIRE', key, ttl)
  extend_ttl(devices, ttl)
  redis.call('HSET', online_key, uid, name)
end

-- The user's sessions: a list of {device, name, server, session id,
-- connected ('0'/'1'), active}, forgetting the devices whose record
-- expired.
local function live_sessions(prefix, uid)
  local index = devices_key(prefix, uid)
  local found = {}
  for _, device in ipairs(redis.call('SMEMBERS', index)) do
    local rec = redis.call('HMGET', session_key(prefix, uid, device), 'name',
                           'server', 'session_id', 'connected', 'active')
    if rec[3] then
      found[#found + 1] = {device, rec[1] or '', rec[2] or '', rec[3],
                           rec[4] or '0', rec[5] or '0'}
    else
      redis.call('SREM', index, device)
    end
  end
  return found
end

-- Whether the user has a connected session.
local function any_connected(prefix, uid)
  for _, device in ipairs(redis.call('SMEMBERS', devices_key(prefix, uid))) do
    if redis.call('HGET', session_key(prefix, uid, device), 'connected') == '1' then
      return true
    end
  end
  return false
end

-- Delete the session of user uid's device: its record, its tokens, its
-- entry in the user's devices and in the set of server (when server is not
-- nil), and the user's online entry when no other device is connected.
local function delete_session(prefix, uid, device, server)
  local tokens = user_key(prefix, 'tokens', uid) .. ':' .. device
  for _, digest in ipairs(redis.call('SMEMBERS', tokens)) do
    redis.call('DEL', prefix .. 'token:' .. digest)
  end
  redis.call('DEL', session_key(prefix, uid, device), tokens)
  redis.call('SREM', devices_key(prefix, uid), device)
  touch(prefix, uid)
  if server then
    redis.call('SREM', prefix .. 'server:' .. server, uid .. ':' .. device)
  end
  if not any_connected(prefix, uid) then
    redis.call('HDEL', prefix .. 'online', uid)
  end
end

-- How long a session ended by a release or by a newer claim is remembered
-- (ms): a renewal from its server within that time finds it ended (and
-- closes its connection) instead of making it again.
local ENDED_TTL = 600000

-- Remember that the session session_id ended (see ENDED_TTL).
local function bury(prefix, session_id)
  redis.call('SET', prefix .. 'ended:' .. session_id, '1', 'PX', ENDED_TTL)
end

-- Whether the session session_id ended within ENDED_TTL.
local function ended(prefix, session_id)
  return redis.call('EXISTS', prefix .. 'ended:' .. session_id) == 1
end

-- The run_id of this Redis: given, as the caller's connection knows it,
-- or asked here when the caller could not tell ('').  A session record
-- keeps the run that wrote it (its 'run' field; none in records of
-- earlier releases), so a renewal can tell a record that came back from
-- an earlier run (a restored backup, a replica that lagged, a restart).
local function this_run(given)
  if given ~= '' then return given end
  return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
end
