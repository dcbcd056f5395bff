-- KEYS: per device, its cursors and its user's set of devices with cursors.
-- ARGV: per device, its id, the number of its cursors, then that many
-- conversation, epoch, seq triples.  A cursor of the stored one's epoch
-- raises it (never lowers it); one of another epoch (or a stored value
-- that is not a position) is replaced.  Returns 1.
-- A device's stored cursors are read in one HMGET and the raised ones
-- written in one HSET (a few microseconds of Redis's time per command),
-- CHUNK cursors at most per command (unpack's bound); a device's lone
-- cursor in one HGET, without the tables of arguments and replies (a
-- Lua table costs Redis about as much as a small command).
-- Needs positions.lua in front.

local CHUNK = 1000

local a = 1
for k = 1, #KEYS, 2 do
  local device, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  if n > 0 then
    -- Device "" is not listed: its cursors' key is known without the set
    -- (forget_cursors.lua).
    if device ~= '' then
      redis.call('SADD', KEYS[k + 1], device)
    end
  end
  if n == 1 then
    -- One cursor (the sweep's usual case): no tables, one HGET.
    local epoch, digits = ARGV[a + 1], ARGV[a + 2]
    local old_epoch, old_seq =
        parse_position(redis.call('HGET', KEYS[k], ARGV[a]))
    if old_epoch ~= epoch or tonumber(digits) > old_seq then
      if epoch ~= '' then digits = epoch .. ':' .. digits end
      redis.call('HSET', KEYS[k], ARGV[a], digits)
    end
    a = a + 3
  elseif n > 1 then
    local fields = {}
    for i = 1, n do
      fields[i] = ARGV[a + 3 * (i - 1)]
    end
    local stored = {}
    for start = 1, n, CHUNK do
      local last = math.min(start + CHUNK - 1, n)
      local got = redis.call('HMGET', KEYS[k], unpack(fields, start, last))
      for i = start, last do stored[i] = got[i - start + 1] end
    end
    local raised = {}
    for i = 1, n do
      local epoch, seq = ARGV[a + 1], tonumber(ARGV[a + 2])
      local old_epoch, old_seq = parse_position(stored[i])
      if old_epoch ~= epoch or seq > old_seq then
        raised[#raised + 1] = fields[i]
        raised[#raised + 1] = format_position(epoch, seq)
      end
      a = a + 3
    end
    for start = 1, #raised, 2 * CHUNK do
      redis.call('HSET', KEYS[k],
                 unpack(raised, start, math.min(start + 2 * CHUNK - 1, #raised)))
    end
  end
end
return 1
