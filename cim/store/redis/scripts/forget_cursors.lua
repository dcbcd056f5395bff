-- KEYS: the user's set of devices with cursors, the cursors of its device
-- "" (kept even by the previous release, which had no such set).  ARGV:
-- conversation, prefix, user id.  Drops the conversation's cursor of every
-- device of the user.  Returns 1.

redis.call('HDEL', KEYS[2], ARGV[1])
for _, device in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if device ~= '' then
    redis.call('HDEL', user_key(ARGV[2], 'cursors', ARGV[3]) .. ':' .. device,
               ARGV[1])
  end
end
return 1
