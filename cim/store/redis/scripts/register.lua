-- KEYS: bykey, user counter.
-- ARGV: name key, name, password hash or '', account key digest or '', prefix.
-- Creates the account unless its name key is taken.
-- Returns {created (0/1), user_id, name, has password (0/1), has key (0/1)}
-- (of the existing account when not created).

local id = redis.call('HGET', KEYS[1], ARGV[1])
if id then
  local f = redis.call('HMGET', user_key(ARGV[5], 'user', id), 'name', 'pw',
                          'key')
  return {0, id, f[1] or '', f[2] and 1 or 0, f[3] and 1 or 0}
end
id = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], id)
local user = user_key(ARGV[5], 'user', id)
if ARGV[3] ~= '' then
  redis.call('HSET', user, 'name', ARGV[2], 'pw', ARGV[3])
  return {1, id, ARGV[2], 1, 0}
elseif ARGV[4] ~= '' then
  redis.call('HSET', user, 'name', ARGV[2], 'key', ARGV[4])
  return {1, id, ARGV[2], 0, 1}
end
redis.call('HSET', user, 'name', ARGV[2])
return {1, id, ARGV[2], 0, 0}
