-- KEYS: the conversation's read positions, epoch record, seq counter.
-- ARGV: user id, seq.  Raises the user's read position (of the current
-- epoch) to seq, at most the last seq; never lowers it.  Returns the
-- user's read position after the call.
-- Needs positions.lua in front.

local e = current_epoch(KEYS[2], KEYS[3])
local current = resume(redis.call('HGET', KEYS[1], ARGV[1]), e)
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
local seq = math.min(tonumber(ARGV[2]), last)
if seq > current then
  redis.call('HSET', KEYS[1], ARGV[1], format_position(e[1], seq))
  return seq
end
return current
