-- KEYS: per device, its cursors and its user's set of devices with cursors.
-- ARGV: per device, its id, the number of its cursors, then that many
-- conversation, position pairs (a position as it is stored: "<epoch>:
-- <seq>", or the digits of a seq of no epoch; positions.lua).  A cursor
-- of the stored one's epoch raises it (never lowers it); one of another
-- epoch (or a stored value that is not a position) is replaced.  Returns 1.
-- A device's stored cursors are read in one HMGET and the raised ones
-- written in one HSET (a few microseconds of Redis's time per command),
-- CHUNK cursors at most per command (unpack's bound); a device's lone
-- cursor in one HGET, without the tables of arguments and replies (a
-- Lua table costs Redis about as much as a small command).  A cursor
-- with none stored (the usual case) is written as it came, unparsed.
-- Needs positions.lua in front.

local CHUNK = 1000

-- Whether position raises stored (a stored value or false).
local function raises(position, stored)
  local old_epoch, old_seq = parse_position(stored)
  if not old_epoch then return true end
  local epoch, seq = parse_position(position)
  return epoch ~= old_epoch or seq > old_seq
end

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
    local position = ARGV[a + 1]
    if raises(position, redis.call('HGET', KEYS[k], ARGV[a])) then
      redis.call('HSET', KEYS[k], ARGV[a], position)
    end
    a = a + 2
  elseif n > 1 then
    local raised = {}
    for start = 1, n, CHUNK do
      local last = math.min(start + CHUNK - 1, n)
      local fields = {}
      for i = start, last do
        fields[i - start + 1] = ARGV[a + 2 * (i - start)]
      end
      local got = redis.call('HMGET', KEYS[k], unpack(fields))
      for j = 1, #fields do
        local position = ARGV[a + 1]
        if raises(position, got[j]) then
          raised[#raised + 1] = fields[j]
          raised[#raised + 1] = position
        end
        a = a + 2
      end
    end
    for start = 1, #raised, 2 * CHUNK do
      redis.call('HSET', KEYS[k],
                 unpack(raised, start, math.min(start + 2 * CHUNK - 1, #raised)))
    end
  end
end
return 1
