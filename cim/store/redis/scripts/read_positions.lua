-- KEYS: the conversation's read positions, epoch record, seq counter.
-- ARGV: user ids.  Returns {epoch id, previous, base, last seq, then each
-- user's stored read position or false}.  (The caller resumes them.)

local rec = redis.call('HMGET', KEYS[2], 'id', 'previous', 'base')
local found = {rec[1] or '', rec[2] or '', rec[3] or '0',
               redis.call('GET', KEYS[3]) or '0'}
if #ARGV > 0 then
  for _, v in ipairs(redis.call('HMGET', KEYS[1], unpack(ARGV))) do
    found[#found + 1] = v or ''
  end
end
return found
