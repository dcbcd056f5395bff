-- KEYS: token, online.  ARGV: prefix, user id, server, ttl ms, active
-- (seconds), and optionally '1' to read the login's reads too.  An IM
-- server's login with a token (RedisStore.activate_token): checks the
-- token and its device's session, and marks the session connected as
-- activate_session.lua does.  Returns {refusal, device, name, session
-- id}: refusal is '' when the session was activated, else one of
-- 'unknown' (no such token, or its session was released or replaced),
-- 'other-user', 'other-server', 'session-elsewhere' (checked in that order;
-- the other fields are '' then).  With the reads (RedisStore.token_login),
-- an activation's reply has two more fields: the user's conversations as
-- conversations.lua lists them, and the device's cursors as HGETALL.
-- Needs sessions.lua and reads.lua in front.

local prefix, uid, server, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local t = redis.call('HMGET', KEYS[1], 'user', 'server', 'session_id', 'device')
local function refuse(why) return {why, '', '', ''} end
if not t[1] then return refuse('unknown') end
local device = t[4] or ''
local key = session_key(prefix, t[1], device)
local rec = redis.call('HMGET', key, 'name', 'server', 'session_id')
if rec[3] ~= t[3] then return refuse('unknown') end
if t[1] ~= uid then return refuse('other-user') end
if t[2] ~= server then return refuse('other-server') end
if rec[2] ~= server then return refuse('session-elsewhere') end
activate(key, devices_key(prefix, uid), KEYS[2], uid, rec[1] or '', ttl,
         ARGV[5], generation_key(prefix, uid))
if ARGV[6] ~= '1' then return {'', device, rec[1] or '', t[3]} end
return {'', device, rec[1] or '', t[3],
        conversation_states(prefix, uid, user_key(prefix, 'pairs', uid),
                            user_key(prefix, 'groups', uid)),
        redis.call('HGETALL', cursor_key(prefix, uid, device))}
