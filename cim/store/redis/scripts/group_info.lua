-- KEYS: group, group settings, members, join points, invited, requests.
-- ARGV: a user id.
-- Returns false (no such group) or {owner, policy, history (each '' when
-- the group has no settings: it is from before owners), member count,
-- member (0/1), the user's join point, invited (0/1), requested (0/1)}.

if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local settings = redis.call('HMGET', KEYS[2], 'owner', 'policy', 'history')
return {
    settings[1] or '', settings[2] or '', settings[3] or '',
    redis.call('SCARD', KEYS[3]),
    redis.call('SISMEMBER', KEYS[3], ARGV[1]),
    redis.call('HGET', KEYS[4], ARGV[1]) or '0',
    redis.call('SISMEMBER', KEYS[5], ARGV[1]),
    redis.call('ZSCORE', KEYS[6], ARGV[1]) and 1 or 0,
}
