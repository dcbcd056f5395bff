-- KEYS: token.  ARGV: prefix.  Returns false or {user id, server, session
-- id, device} when the token's session is still its device's session.
-- Needs sessions.lua in front.

local t = redis.call('HMGET', KEYS[1], 'user', 'server', 'session_id', 'device')
if not t[1] then return false end
local device = t[4] or ''
if redis.call('HGET', session_key(ARGV[1], t[1], device), 'session_id') ~= t[3] then
  return false
end
return {t[1], t[2], t[3], device}
