-- KEYS: group, members, the owner's groups, group settings.
-- ARGV: owner id, group id, policy, history.
-- Returns 1, or 0 when the group exists.

if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('HSET', KEYS[4], 'owner', ARGV[1], 'policy', ARGV[3], 'history', ARGV[4])
return 1
