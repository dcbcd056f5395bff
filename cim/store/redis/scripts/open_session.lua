-- A route's login in one round trip (RedisStore.open_session): claim the
-- device's session (as claim_session.lua), then issue its token (as
-- issue_token.lua) and update device keys.
-- KEYS: the device's session, the user's devices, the server's sessions,
-- the token, the device's token set, the device's device key.
-- ARGV: the first ten of claim_session.lua, then token ttl ms, token
-- digest, the new device key's digest ('': none), its ttl ms, the digest
-- of the device key the login presented ('': none), dropped when no new
-- one is given, then the run_id of this Redis ('': ask it; the last of
-- claim_session.lua).
-- Returns {-1} when the presented key is no longer the device's (another
-- login used it), changing nothing; else what claim_session.lua returns.
-- When claimed, the device keys of the other devices whose sessions it
-- dropped are dropped too.
-- Needs sessions.lua and claims.lua in front.

if ARGV[15] ~= '' and redis.call('GET', KEYS[6]) ~= ARGV[15] then
  return {-1}
end
local result = claim(KEYS[1], KEYS[2], KEYS[3], ARGV, ARGV[16])
if result[1] == 0 then return result end
local uid, prefix, device = ARGV[1], ARGV[7], ARGV[8]
for i = 2, #result, 6 do
  if result[i] ~= device then
    redis.call('DEL', user_key(prefix, 'devkey', uid) .. ':' .. result[i])
  end
end
issue(prefix, KEYS[4], KEYS[5], uid, ARGV[3], ARGV[4], ARGV[11], ARGV[12],
      device)
if ARGV[13] ~= '' then
  redis.call('SET', KEYS[6], ARGV[13], 'PX', ARGV[14])
elseif ARGV[15] ~= '' then
  redis.call('DEL', KEYS[6])
end
return result
