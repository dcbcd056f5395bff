-- KEYS: none (the session keys follow from the prefix).  ARGV: prefix,
-- server, ttl ms, then per session held by that server: user id, session
-- id, user name, device, active (seconds).  Returns {lost, restored}: the
-- session ids that are not their device's session any more (a newer login
-- replaced them, or the device limit dropped them: their server should
-- close them), and those made again (their server should catch them up).
--
-- A session that is still its device's gets its time to live again, and
-- its active time when later than the stored one; one that expired
-- meanwhile (its server could not renew it in time, Redis was away) is
-- made again as it was, connected: its server still holds it.  One that
-- was released or dropped by a newer claim (sessions.lua's bury) is lost,
-- even when its device has no session now.
-- Needs sessions.lua in front.

local prefix, server, ttl = ARGV[1], ARGV[2], ARGV[3]
local lost, restored = {}, {}
if #ARGV > 3 then
  redis.call('SADD', prefix .. 'servers', server)
end
for i = 4, #ARGV, 5 do
  local uid, sid, name, device, active = ARGV[i], ARGV[i + 1], ARGV[i + 2],
                                         ARGV[i + 3], ARGV[i + 4]
  local key = session_key(prefix, uid, device)
  local current = redis.call('HMGET', key, 'session_id', 'active')
  if current[1] == sid then
    redis.call('PEXPIRE', key, ttl)
    if tonumber(active) > (tonumber(current[2]) or 0) then
      redis.call('HSET', key, 'active', active)
    end
    extend_ttl(devices_key(prefix, uid), ttl)
  elseif not current[1] and not ended(prefix, sid) then
    redis.call('HSET', key, 'name', name, 'server', server, 'session_id', sid,
               'connected', '1', 'active', active)
    redis.call('PEXPIRE', key, ttl)
    redis.call('SADD', devices_key(prefix, uid), device)
    extend_ttl(devices_key(prefix, uid), ttl)
    redis.call('SADD', prefix .. 'server:' .. server, uid .. ':' .. device)
    redis.call('HSET', prefix .. 'online', uid, name)
    touch(prefix, uid)
    restored[#restored + 1] = sid
  else
    lost[#lost + 1] = sid
  end
end
return {lost, restored}
