-- KEYS: per conversation, its epoch record and its seq counter.  Returns
-- per conversation its epoch id, previous, base ('' each without a record)
-- and last seq, flat.

local found = {}
for k = 1, #KEYS, 2 do
  local rec = redis.call('HMGET', KEYS[k], 'id', 'previous', 'base')
  found[#found + 1] = rec[1] or ''
  found[#found + 1] = rec[2] or ''
  found[#found + 1] = rec[3] or ''
  found[#found + 1] = redis.call('GET', KEYS[k + 1]) or '0'
end
return found
