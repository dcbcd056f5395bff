-- KEYS: group, requests.
-- Returns false (no such group) or the pending user ids, oldest first.

if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('ZRANGE', KEYS[2], 0, -1)
