-- KEYS: byname.  ARGV: name, prefix.
-- Returns false, or {user_id, password hash or ''}.

local id = redis.call('HGET', KEYS[1], ARGV[1])
if not id then return false end
return {id, redis.call('HGET', ARGV[2] .. 'user:' .. id, 'pw') or ''}
