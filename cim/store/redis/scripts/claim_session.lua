-- KEYS: the device's session, the user's devices, the server's sessions.
-- ARGV: user id, name, server, session id, ttl ms, replace (0/1), prefix,
-- device, max devices, active (seconds), then the run_id of this Redis
-- ('': ask it), kept in the session's record.
-- Returns {claimed (0/1), ...}: when not claimed, the fields of the session
-- that refused it (the device's own, else the first by device); when
-- claimed, those of each session dropped (the device's old one, then the
-- least recently active others past max devices).  A session's fields:
-- device, name, server, session id, connected ('0'/'1'), active.
-- Needs sessions.lua and claims.lua in front.

return claim(KEYS[1], KEYS[2], KEYS[3], ARGV, ARGV[11])
