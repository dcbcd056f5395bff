-- KEYS: none (the session keys follow from the prefix).  ARGV: prefix,
-- server, ttl ms, then per session held by that server: user id, session
-- id, user name.  Returns the user ids whose session is now another one
-- (replaced by a newer login): their server should close them.
--
-- A session that is still the user's gets its time to live again; one
-- that expired meanwhile (its server could not renew it in time, Redis was
-- away) is made again as it was, connected: its server still holds it.

local prefix, server, ttl = ARGV[1], ARGV[2], ARGV[3]
local lost = {}
for i = 4, #ARGV, 3 do
  local uid, sid, name = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local key = prefix .. 'session:' .. uid
  local current = redis.call('HGET', key, 'session_id')
  if current == sid then
    redis.call('PEXPIRE', key, ttl)
  elseif not current then
    redis.call('HSET', key, 'name', name, 'server', server, 'session_id', sid,
               'connected', '1')
    redis.call('PEXPIRE', key, ttl)
    redis.call('SADD', prefix .. 'server:' .. server, uid)
    redis.call('HSET', prefix .. 'online', uid, name)
  else
    lost[#lost + 1] = uid
  end
end
return lost
