-- Not a script of its own: put in front of the scripts that delete a
-- session (claim_session, release_session, drop_server_sessions).
-- delete_session(prefix, uid, server) deletes the session of user uid: its
-- record, online entry, tokens, and its entry in the set of server (when
-- server is not nil).

local function delete_session(prefix, uid, server)
  local tokens = prefix .. 'tokens:' .. uid
  for _, digest in ipairs(redis.call('SMEMBERS', tokens)) do
    redis.call('DEL', prefix .. 'token:' .. digest)
  end
  redis.call('DEL', prefix .. 'session:' .. uid, tokens)
  redis.call('HDEL', prefix .. 'online', uid)
  if server then
    redis.call('SREM', prefix .. 'server:' .. server, uid)
  end
end
