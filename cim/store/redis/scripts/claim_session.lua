-- KEYS: the device's session, the user's devices, the server's sessions.
-- ARGV: user id, name, server, session id, ttl ms, replace (0/1), prefix,
-- device, max devices, active (seconds).
-- Returns {claimed (0/1), ...}: when not claimed, the fields of the session
-- that refused it (the device's own, else the first by device); when
-- claimed, those of each session dropped (the device's old one, then the
-- least recently active others past max devices).  A session's fields:
-- device, name, server, session id, connected ('0'/'1'), active.
-- Needs sessions.lua in front.

local uid, device, prefix = ARGV[1], ARGV[8], ARGV[7]
local live = live_sessions(prefix, uid)
if #live > 0 and ARGV[6] ~= '1' then
  local first = live[1]
  for _, s in ipairs(live) do
    if s[1] == device then first = s break end
    if s[1] < first[1] then first = s end
  end
  return {0, unpack(first)}
end

local result = {1}
local function drop(s)
  delete_session(prefix, uid, s[1], s[3])
  for _, v in ipairs(s) do result[#result + 1] = v end
end

local others = {}
for _, s in ipairs(live) do
  if s[1] == device then drop(s) else others[#others + 1] = s end
end
table.sort(others, function(a, b)
  local x, y = tonumber(a[6]) or 0, tonumber(b[6]) or 0
  if x ~= y then return x < y end
  return a[1] < b[1]
end)
for i = 1, #others - math.max(1, tonumber(ARGV[9])) + 1 do
  drop(others[i])
end

redis.call('HSET', KEYS[1], 'name', ARGV[2], 'server', ARGV[3],
           'session_id', ARGV[4], 'connected', '0', 'active', ARGV[10])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('SADD', KEYS[2], device)
extend_ttl(KEYS[2], ARGV[5])
redis.call('SADD', KEYS[3], uid .. ':' .. device)
return result
