-- KEYS: online.  ARGV: prefix.  Returns user id, name, user id, name, ...
-- of the connected sessions; drops the entries whose session expired.

local flat = redis.call('HGETALL', KEYS[1])
local found = {}
for i = 1, #flat, 2 do
  local uid = flat[i]
  if redis.call('HGET', ARGV[1] .. 'session:' .. uid, 'connected') == '1' then
    found[#found + 1] = uid
    found[#found + 1] = flat[i + 1]
  else
    redis.call('HDEL', KEYS[1], uid)
  end
end
return found
