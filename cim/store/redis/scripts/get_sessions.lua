-- KEYS: the device sets of users.  ARGV: prefix, connected only (0/1; 2:
-- connected only, with the generations), then the user id of each key;
-- with 2, last, the run_id of this Redis as the connection knows it ('':
-- unknown).  Returns, flat, per session (only the connected ones when
-- asked so): the index of its user's key, device, name, server, session
-- id, connected ('0'/'1'), active; with 2, in front of them, that run_id
-- and each user's session generation (sessions.lua's generation_key, read
-- with the sessions: cim.delivery's session cache).  A device whose
-- record expired is dropped from its user's set (as sessions.lua's
-- live_sessions does).
--
-- At every delivery (RedisStore.get_sessions): one flat reply and no table
-- per session (each Lua table and each nested reply costs Redis more than
-- the lookups themselves).

local prefix, only_connected = ARGV[1], ARGV[2] ~= '0'
local found = {}
local n = 0
if ARGV[2] == '2' then
  local keys = {}
  for i = 1, #KEYS do keys[i] = user_key(prefix, 'sgen', ARGV[i + 2]) end
  found = redis.call('MGET', unpack(keys))
  for i = 1, #KEYS do found[i] = found[i] or '0' end
  table.insert(found, 1, ARGV[#ARGV])
  n = #KEYS + 1
end
for i = 1, #KEYS do
  local uid = ARGV[i + 2]
  for _, device in ipairs(redis.call('SMEMBERS', KEYS[i])) do
    local rec = redis.call('HMGET', user_key(prefix, 'session', uid) .. ':' .. device,
                           'name', 'server', 'session_id', 'connected', 'active')
    if not rec[3] then
      redis.call('SREM', KEYS[i], device)
    elseif rec[4] == '1' or not only_connected then
      found[n + 1] = i
      found[n + 2] = device
      found[n + 3] = rec[1] or ''
      found[n + 4] = rec[2] or ''
      found[n + 5] = rec[3]
      found[n + 6] = rec[4] or '0'
      found[n + 7] = rec[5] or '0'
      n = n + 7
    end
  end
end
return found
