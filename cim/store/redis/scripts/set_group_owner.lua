-- KEYS: group, group settings.  ARGV: the new owner's id.
-- Returns 1, or -1 (no such group).  A group from before owners gets an
-- owner and stays open (no policy field).

if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HSET', KEYS[2], 'owner', ARGV[1])
return 1
