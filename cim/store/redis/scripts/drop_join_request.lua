-- KEYS: group, requests.  ARGV: user id.
-- Returns 1 (dropped), 0 (none pending) or -1 (no such group).

if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('ZREM', KEYS[2], ARGV[1])
