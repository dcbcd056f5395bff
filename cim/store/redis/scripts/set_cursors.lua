-- KEYS: cursors.  ARGV: conversation, seq, conversation, seq, ...  Each seq
-- is a whole number of at most 2^53 - 1 (exact as a Lua number), stored as
-- the string it came as: never a float's form.
-- Returns 1.

-- A stored cursor as a number; 0 for what is not digits (a value written
-- by an older version as a float, or by hand), so that it gets replaced.
local function stored(value)
  if value and #value <= 16 and string.match(value, '^%d+$') then
    return tonumber(value)
  end
  return 0
end

for i = 1, #ARGV, 2 do
  local current = stored(redis.call('HGET', KEYS[1], ARGV[i]))
  if tonumber(ARGV[i + 1]) > current then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
