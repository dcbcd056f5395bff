-- KEYS: token, the device's token set.  ARGV: user id, server, session id,
-- ttl ms, digest, prefix, device.  Returns 1.

for _, digest in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('EXISTS', ARGV[6] .. 'token:' .. digest) == 0 then
    redis.call('SREM', KEYS[2], digest)
  end
end
redis.call('HSET', KEYS[1], 'user', ARGV[1], 'server', ARGV[2],
           'session_id', ARGV[3], 'device', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SADD', KEYS[2], ARGV[5])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[4]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return 1
