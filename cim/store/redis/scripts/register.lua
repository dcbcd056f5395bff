-- KEYS: byname, user counter.  ARGV: name, has password, hash, prefix.
-- Returns {created (0/1), user_id, password hash or ''}.

local id = redis.call('HGET', KEYS[1], ARGV[1])
if id then
  return {0, id, redis.call('HGET', ARGV[4] .. 'user:' .. id, 'pw') or ''}
end
id = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], id)
local user = ARGV[4] .. 'user:' .. id
redis.call('HSET', user, 'name', ARGV[1])
if ARGV[2] == '1' then
  redis.call('HSET', user, 'pw', ARGV[3])
  return {1, id, ARGV[3]}
end
return {1, id, ''}
