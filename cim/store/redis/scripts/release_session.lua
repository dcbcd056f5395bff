-- KEYS: the device's session.  ARGV: user id, session id, prefix, device.
-- Returns 1 or 0.
-- Needs sessions.lua in front.

local rec = redis.call('HMGET', KEYS[1], 'session_id', 'server')
if rec[1] ~= ARGV[2] then return 0 end
delete_session(ARGV[3], ARGV[1], ARGV[4], rec[2])
return 1
