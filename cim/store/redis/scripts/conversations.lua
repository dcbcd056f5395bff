-- KEYS: the user's private conversations (pairs), the user's groups.
-- ARGV: user id, prefix.  Returns per conversation what
-- conversation_states (reads.lua) lists, flat.
-- With a third key, a device's cursors (a login's reads,
-- RedisStore.login_reads): returns {that list, the cursors as HGETALL}.
-- Needs reads.lua in front.

local found = conversation_states(ARGV[2], ARGV[1], KEYS[1], KEYS[2])
if KEYS[3] then return {found, redis.call('HGETALL', KEYS[3])} end
return found
