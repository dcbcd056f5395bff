-- KEYS: online.  ARGV: prefix, HSCAN cursor, how many entries to look at.
-- Returns {next cursor ('0': done), {user id, name, user id, name, ...}}:
-- the users with a connected session among the entries this step of the
-- scan looked at; drops the entries of the others (their sessions
-- expired).  The caller scans the whole hash a step at a time
-- (RedisStore.online_users), so that no call holds Redis long.
-- Needs sessions.lua in front.

local scan = redis.call('HSCAN', KEYS[1], ARGV[2], 'COUNT', ARGV[3])
local flat = scan[2]
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
return {scan[1], found}
