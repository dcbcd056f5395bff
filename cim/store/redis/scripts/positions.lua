-- Not a script of its own: put in front of the scripts that read or write
-- positions (cursors, read positions) and epochs (scripts/__init__.py says
-- which).
--
-- A position is stored as "<epoch>:<seq>", or as bare digits for a seq
-- of no epoch ("", written so by the previous release too); each seq a
-- whole number of at most 2^53 - 1 (exact as a Lua number), written as
-- digits, never a float's form.  A conversation's epoch record is the
-- fields id, previous, base, run of its hash 'read' (keys.lua), beside
-- its users' read positions.

local MAX_SEQ = 9007199254740991

-- The epoch and seq of a stored position, or nil for what is not one (a
-- float's form written by an older version, a value written by hand).
local function parse_position(value)
  if not value then return nil end
  local epoch, digits = string.match(value, '^(.*):(%d+)$')
  if not digits then
    epoch, digits = '', string.match(value, '^(%d+)$')
  end
  if not digits or #digits > 16 then return nil end
  local seq = tonumber(digits)
  if seq > MAX_SEQ then return nil end
  return epoch, seq
end

local function format_position(epoch, seq)
  local digits = string.format('%d', seq)
  if epoch == '' then return digits end
  return epoch .. ':' .. digits
end

-- A conversation's current epoch: {id, previous, base}; without a record
-- {'', '', its last seq}.
local function current_epoch(epoch_key, seq_key)
  local rec = redis.call('HMGET', epoch_key, 'id', 'previous', 'base')
  if rec[1] then
    return {rec[1], rec[2] or '', tonumber(rec[3]) or 0}
  end
  return {'', '', tonumber(redis.call('GET', seq_key) or '0')}
end

-- Where a stored position resumes in epoch e (cim.interfaces.Epoch.resume,
-- the seq only): the current epoch is trusted, the previous one up to its
-- base, no other.
local function resume(value, e)
  local epoch, seq = parse_position(value)
  if not epoch or seq <= 0 then return 0 end
  if e[1] ~= '' and epoch == e[1] then return seq end
  if epoch == e[2] then return math.min(seq, e[3]) end
  return 0
end
