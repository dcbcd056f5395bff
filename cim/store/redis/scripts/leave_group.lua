-- KEYS: group, members, the user's groups, join points.
-- ARGV: user id, group id.
-- Returns 1 (changed), 0 (unchanged) or -1 (no such group).

if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[1])
return redis.call('SREM', KEYS[2], ARGV[1])
