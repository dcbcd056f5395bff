-- KEYS: group, members, the user's groups, join points, invited, requests.
-- ARGV: user id, group id, the seq the user joins at.
-- Returns 1 (changed), 0 (unchanged) or -1 (no such group).  The user's
-- invitation and request are used up either way.

if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('SREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
return 1
