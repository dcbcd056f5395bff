-- KEYS: the server's sessions ("<user id>:<device>"; a bare user id,
-- written by the previous release, names device "").  ARGV: server,
-- prefix.  Returns the user ids that lost a session (perhaps repeated).
-- Needs sessions.lua in front.

local dropped = {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local uid, device = string.match(member, '^(%d+):(.*)$')
  if not uid then uid, device = member, '' end
  if redis.call('HGET', session_key(ARGV[2], uid, device), 'server') == ARGV[1] then
    delete_session(ARGV[2], uid, device, nil)
    dropped[#dropped + 1] = uid
  end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', ARGV[2] .. 'servers', ARGV[1])
return dropped
