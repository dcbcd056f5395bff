-- KEYS: group, requests.  ARGV: user id, time asked (ms), how many requests
-- may be pending.
-- Returns 1 (new), 0 (already pending), -1 (no such group) or -2 (too many
-- pending).

if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return -2 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
