-- KEYS: the cursor hashes of several users.  ARGV: for each key, the number
-- of its cursors, then that many conversation, seq pairs (each seq a whole
-- number of at most 2^53 - 1, stored as the string it came as: never a
-- float's form).  Returns 1.

-- A stored cursor as a number; 0 for what is not digits (a value written
-- by an older version as a float, or by hand), so that it gets replaced.
local function stored(value)
  if value and #value <= 16 and string.match(value, '^%d+$') then
    return tonumber(value)
  end
  return 0
end

local a = 1
for k = 1, #KEYS do
  local n = tonumber(ARGV[a])
  a = a + 1
  for i = 1, n do
    local current = stored(redis.call('HGET', KEYS[k], ARGV[a]))
    if tonumber(ARGV[a + 1]) > current then
      redis.call('HSET', KEYS[k], ARGV[a], ARGV[a + 1])
    end
    a = a + 2
  end
end
return 1
