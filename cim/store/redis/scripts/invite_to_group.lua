-- KEYS: group, invited.  ARGV: user id.
-- Returns 1 (new), 0 (already invited) or -1 (no such group).

if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('SADD', KEYS[2], ARGV[1])
