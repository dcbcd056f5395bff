-- KEYS: token, the device's token set.  ARGV: user id, server, session id,
-- ttl ms, digest, prefix, device.  Returns 1.
-- Needs sessions.lua and claims.lua in front.

issue(ARGV[6], KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
      ARGV[7])
return 1
