-- KEYS: session records.  Returns {index, name, server, session id} of the
-- connected ones.

local found = {}
for i, key in ipairs(KEYS) do
  local rec = redis.call('HMGET', key, 'name', 'server', 'session_id',
                         'connected')
  if rec[4] == '1' then
    found[#found + 1] = {i, rec[1], rec[2], rec[3]}
  end
end
return found
