-- Not a script of its own: put (after sessions.lua) in front of the
-- scripts that claim sessions and issue tokens (scripts/__init__.py says
-- which).

-- Claim a session of user uid's device (claim_session.lua says how):
-- keys are the device's session, the user's devices and the server's
-- sessions; a is {uid, name, server, session id, ttl ms, replace ('0'/'1'),
-- prefix, device, max devices, active}; run is the run_id of this Redis
-- ('': ask it), kept in the record (sessions.lua's this_run).  Returns {claimed (0/1), ...}: when
-- not claimed, the fields of the session that refused it; when claimed,
-- those of each session dropped (device, name, server, session id,
-- connected, active each).
local function claim(session_key, devices_key, server_key, a, run)
  local uid, device, prefix = a[1], a[8], a[7]
  local live = live_sessions(prefix, uid)
  if #live > 0 and a[6] ~= '1' then
    local first = live[1]
    for _, s in ipairs(live) do
      if s[1] == device then first = s break end
      if s[1] < first[1] then first = s end
    end
    return {0, unpack(first)}
  end

  local result = {1}
  local function drop(s)
    delete_session(prefix, uid, s[1], s[3])
    bury(prefix, s[4])
    for _, v in ipairs(s) do result[#result + 1] = v end
  end

  local others = {}
  for _, s in ipairs(live) do
    if s[1] == device then drop(s) else others[#others + 1] = s end
  end
  table.sort(others, function(x, y)
    local p, q = tonumber(x[6]) or 0, tonumber(y[6]) or 0
    if p ~= q then return p < q end
    return x[1] < y[1]
  end)
  for i = 1, #others - math.max(1, tonumber(a[9])) + 1 do
    drop(others[i])
  end

  redis.call('HSET', session_key, 'name', a[2], 'server', a[3],
             'session_id', a[4], 'connected', '0', 'active', a[10],
             'run', this_run(run))
  redis.call('PEXPIRE', session_key, a[5])
  redis.call('SADD', devices_key, device)
  extend_ttl(devices_key, a[5])
  redis.call('SADD', server_key, uid .. ':' .. device)
  redis.call('SADD', prefix .. 'servers', a[3])
  touch(prefix, uid)
  return result
end

-- Issue a token (its digest) for a session of user uid's device, valid ttl
-- ms: its record token_key, listed in the device's set tokens_key (whose
-- expired entries are dropped here).
local function issue(prefix, token_key, tokens_key, uid, server, session_id,
                     ttl, digest, device)
  for _, old in ipairs(redis.call('SMEMBERS', tokens_key)) do
    if redis.call('EXISTS', prefix .. 'token:' .. old) == 0 then
      redis.call('SREM', tokens_key, old)
    end
  end
  redis.call('HSET', token_key, 'user', uid, 'server', server,
             'session_id', session_id, 'device', device)
  redis.call('PEXPIRE', token_key, ttl)
  redis.call('SADD', tokens_key, digest)
  if redis.call('PTTL', tokens_key) < tonumber(ttl) then
    redis.call('PEXPIRE', tokens_key, ttl)
  end
end
