-- KEYS: session.  ARGV: user id, name, server, session id, ttl ms, replace,
-- prefix.  Returns {claimed (0/1)} followed by the previous session's name,
-- server, session id and connected flag when there was one.
-- Needs delete_session.lua in front.

local old = redis.call('HMGET', KEYS[1], 'name', 'server', 'session_id',
                       'connected')
local result = {1}
if old[3] then
  if ARGV[6] ~= '1' then
    return {0, old[1], old[2], old[3], old[4]}
  end
  delete_session(ARGV[7], ARGV[1], old[2])
  result = {1, old[1], old[2], old[3], old[4]}
end
redis.call('HSET', KEYS[1], 'name', ARGV[2], 'server', ARGV[3],
           'session_id', ARGV[4], 'connected', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SADD', ARGV[7] .. 'server:' .. ARGV[3], ARGV[1])
return result
