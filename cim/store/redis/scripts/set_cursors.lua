-- KEYS: per device, its cursors and its user's set of devices with cursors.
-- ARGV: per device, its id, the number of its cursors, then that many
-- conversation, epoch, seq triples.  A cursor of the stored one's epoch
-- raises it (never lowers it); one of another epoch (or a stored value
-- that is not a position) is replaced.  Returns 1.
-- Needs positions.lua in front.

local a = 1
for k = 1, #KEYS, 2 do
  local device, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  if n > 0 then
    redis.call('SADD', KEYS[k + 1], device)
  end
  for _ = 1, n do
    local conversation, epoch, seq = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
    local old_epoch, old_seq = parse_position(redis.call('HGET', KEYS[k], conversation))
    if old_epoch ~= epoch or seq > old_seq then
      redis.call('HSET', KEYS[k], conversation, format_position(epoch, seq))
    end
    a = a + 3
  end
end
return 1
