-- KEYS: token.  ARGV: prefix.  Returns false or {user id, server, session id}.

local t = redis.call('HMGET', KEYS[1], 'user', 'server', 'session_id')
if not t[1] then return false end
if redis.call('HGET', ARGV[1] .. 'session:' .. t[1], 'session_id') ~= t[3] then
  return false
end
return t
