-- KEYS: the cursor hashes of several users.  ARGV: for each key, the number
-- of its cursors, then that many conversation, seq pairs.  Returns 1.

local a = 1
for k = 1, #KEYS do
  local n = tonumber(ARGV[a])
  a = a + 1
  for i = 1, n do
    local seq = tonumber(ARGV[a + 1])
    if seq > tonumber(redis.call('HGET', KEYS[k], ARGV[a]) or '0') then
      redis.call('HSET', KEYS[k], ARGV[a], seq)
    end
    a = a + 2
  end
end
return 1
