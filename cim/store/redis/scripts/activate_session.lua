-- KEYS: the device's session, online, the user's devices, the user's
-- session generation.  ARGV: user id,
-- session id, ttl ms, active (seconds).  Returns 1 or 0.  A connected
-- session lives ttl ms unless its server renews it (renew_sessions.lua).
-- Needs sessions.lua in front.

local rec = redis.call('HMGET', KEYS[1], 'session_id', 'name')
if rec[1] ~= ARGV[2] then return 0 end
activate(KEYS[1], KEYS[3], KEYS[2], ARGV[1], rec[2], ARGV[3], ARGV[4],
         KEYS[4])
return 1
