-- KEYS: session, online.  ARGV: user id, session id, ttl ms.  Returns 1 or
-- 0.  A connected session lives ttl ms unless its server renews it
-- (renew_sessions.lua).

local rec = redis.call('HMGET', KEYS[1], 'session_id', 'name')
if rec[1] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'connected', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], rec[2])
return 1
