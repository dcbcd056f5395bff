-- KEYS: group, members.  Returns false (no such group) or the members.

if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('SMEMBERS', KEYS[2])
