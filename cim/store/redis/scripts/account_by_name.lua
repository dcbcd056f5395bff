-- KEYS: bykey.  ARGV: name key, prefix.
-- Returns false, or {user_id, name, has password (0/1), has key (0/1)}.

local id = redis.call('HGET', KEYS[1], ARGV[1])
if not id then return false end
local f = redis.call('HMGET', user_key(ARGV[2], 'user', id), 'name', 'pw',
                      'key')
return {id, f[1] or '', f[2] and 1 or 0, f[3] and 1 or 0}
