-- KEYS: the user's private conversations (pairs), the user's groups.
-- ARGV: user id, prefix.  Returns per conversation (its pairs, then
-- its groups): conversation, group id ('' for a pair), epoch id, previous,
-- base, last seq, the user's stored read position, then for a pair the
-- peer's and for a group the user's join point ('' each when none), flat.
-- (The caller resumes the positions and finds the peer.)
-- With a third key, a device's cursors (a login's reads,
-- RedisStore.login_reads): returns {that list, the cursors as HGETALL}.

local uid, prefix = ARGV[1], ARGV[2]
local found = {}
local function add(conversation, group_id, peer)
  -- The conversation's hash holds its epoch record and read positions.
  local rec
  if peer then
    rec = redis.call('HMGET', prefix .. 'read:' .. conversation,
                     'id', 'previous', 'base', uid, peer)
  else
    rec = redis.call('HMGET', prefix .. 'read:' .. conversation,
                     'id', 'previous', 'base', uid)
    rec[5] = redis.call('HGET', prefix .. 'joined:' .. group_id, uid)
  end
  for _, v in ipairs({conversation, group_id, rec[1] or '', rec[2] or '',
                      rec[3] or '',
                      redis.call('GET', prefix .. 'seq:' .. conversation) or '0',
                      rec[4] or '', rec[5] or ''}) do
    found[#found + 1] = v
  end
end
for _, conversation in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local low, high = string.match(conversation, '^p:(%d+):(%d+)$')
  local peer = low
  if low == uid then peer = high end
  add(conversation, '', peer)
end
for _, group_id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  add('g:' .. group_id, group_id, nil)
end
if KEYS[3] then return {found, redis.call('HGETALL', KEYS[3])} end
return found
