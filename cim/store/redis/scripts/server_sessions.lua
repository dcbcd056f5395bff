-- KEYS: the server's sessions (entries as sessions.lua's server_entry
-- reads them).  ARGV: server, prefix, SSCAN cursor, how many members to
-- look at.  Returns {next cursor ('0': done), {member, session id,
-- member, session id, ...}}: a step of the scan of the set, each member
-- with the id of its device's session when that session is on this
-- server, '' when it is not (or is gone): what drop_sessions.lua then
-- drops (RedisStore.drop_server_sessions).  Reads only.
-- Needs sessions.lua in front.

local scan = redis.call('SSCAN', KEYS[1], ARGV[3], 'COUNT', ARGV[4])
local found = {}
for _, member in ipairs(scan[2]) do
  local uid, device = server_entry(member)
  local record = redis.call('HMGET', session_key(ARGV[2], uid, device),
                            'server', 'session_id')
  found[#found + 1] = member
  if record[1] == ARGV[1] and record[2] then
    found[#found + 1] = record[2]
  else
    found[#found + 1] = ''
  end
end
return {scan[1], found}
