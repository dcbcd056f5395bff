-- KEYS: the server's sessions (as server_sessions.lua).  ARGV: server,
-- prefix, whether this is the last step ('1' or '0'), then member and
-- session id pairs as server_sessions.lua read them.  Drops each session
-- that is still the one read (a session the server made since, after a
-- restart, has another id: it stays), and the set's entries whose
-- device's session is not on this server any more.  At the last step,
-- when the set is empty, the server leaves the servers that hold
-- sessions.  Returns the user ids that lost a session.
-- Needs sessions.lua in front.

local server, prefix = ARGV[1], ARGV[2]
local dropped = {}
for i = 4, #ARGV, 2 do
  local member, session_id = ARGV[i], ARGV[i + 1]
  local uid, device = server_entry(member)
  local record = redis.call('HMGET', session_key(prefix, uid, device),
                            'server', 'session_id')
  if record[1] ~= server then
    -- Gone, or its device's session is elsewhere now.
    redis.call('SREM', KEYS[1], member)
  elseif session_id ~= '' and record[2] == session_id then
    delete_session(prefix, uid, device, server)
    if member == uid then
      -- (An entry of an earlier release: a bare user id.)
      redis.call('SREM', KEYS[1], member)
    end
    dropped[#dropped + 1] = uid
  end
end
if ARGV[3] == '1' and redis.call('SCARD', KEYS[1]) == 0 then
  redis.call('SREM', prefix .. 'servers', server)
end
return dropped
