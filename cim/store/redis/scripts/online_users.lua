-- KEYS: online.  ARGV: prefix.  Returns user id, name, user id, name, ...
-- of the users with a connected session; drops the entries of the others
-- (their sessions expired).
-- Needs sessions.lua in front.

local flat = redis.call('HGETALL', KEYS[1])
local found = {}
for i = 1, #flat, 2 do
  local uid = flat[i]
  if any_connected(ARGV[1], uid) then
    found[#found + 1] = uid
    found[#found + 1] = flat[i + 1]
  else
    redis.call('HDEL', KEYS[1], uid)
  end
end
return found
