-- KEYS: the user id counter.  ARGV: prefix.  Returns 1 when the store's
-- newest account (accounts are never deleted) is kept under the name the
-- releases before hash tags gave it (user:<id>, not user:{<id>}): a store
-- of an earlier release, not migrated; else 0 (a new store, or one of
-- this layout).

local newest = redis.call('GET', KEYS[1])
if newest and redis.call('EXISTS', ARGV[1] .. 'user:' .. newest) == 1
    and redis.call('EXISTS', user_key(ARGV[1], 'user', newest)) == 0 then
  return 1
end
return 0
