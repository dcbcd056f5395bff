-- Not a script of its own: put in front of the scripts that read where a
-- user stands in its conversations (scripts/__init__.py says which).

-- Per conversation of user uid (its pairs, from the set pairs_key, then
-- its groups, from the set groups_key): conversation, group id ('' for a
-- pair), epoch id, previous, base, last seq, the user's stored read
-- position, then for a pair the peer's and for a group the user's join
-- point ('' each when none), flat.  (The caller resumes the positions and
-- finds the peer.)
local function conversation_states(prefix, uid, pairs_key, groups_key)
  local found = {}
  local function add(conversation, group_id, peer)
    -- The conversation's hash holds its epoch record and read positions.
    local rec
    if peer then
      rec = redis.call('HMGET', conversation_key(prefix, 'read', conversation),
                       'id', 'previous', 'base', uid, peer)
    else
      rec = redis.call('HMGET', conversation_key(prefix, 'read', conversation),
                       'id', 'previous', 'base', uid)
      rec[5] = redis.call('HGET', group_key(prefix, 'joined', group_id), uid)
    end
    for _, v in ipairs({conversation, group_id, rec[1] or '', rec[2] or '',
                        rec[3] or '',
                        redis.call('GET', conversation_key(prefix, 'seq', conversation))
                          or '0',
                        rec[4] or '', rec[5] or ''}) do
      found[#found + 1] = v
    end
  end
  for _, conversation in ipairs(redis.call('SMEMBERS', pairs_key)) do
    local low, high = string.match(conversation, '^p:(%d+):(%d+)$')
    local peer = low
    if low == uid then peer = high end
    add(conversation, '', peer)
  end
  for _, group_id in ipairs(redis.call('SMEMBERS', groups_key)) do
    add('g:' .. group_id, group_id, nil)
  end
  return found
end

-- The key of a device's cursors (RedisStore._cursor_key): device '' keeps
-- the per-user key.
local function cursor_key(prefix, uid, device)
  if device == '' then return user_key(prefix, 'cursors', uid) end
  return user_key(prefix, 'cursors', uid) .. ':' .. device
end
