-- KEYS: server set.  ARGV: server, prefix.  Returns the dropped user ids.
-- Needs delete_session.lua in front.

local dropped = {}
for _, uid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('HGET', ARGV[2] .. 'session:' .. uid, 'server') == ARGV[1] then
    delete_session(ARGV[2], uid, nil)
    dropped[#dropped + 1] = uid
  end
end
redis.call('DEL', KEYS[1])
return dropped
