-- KEYS: a conversation's epoch record as the previous release kept it
-- (epoch:<conversation>), the conversation's hash (read:<conversation>).
-- Moves the record's fields into the hash (unless the hash holds an epoch
-- already: one the new release started, which stands) and deletes it.
-- Returns 1 when there was a record, else 0.

local rec = redis.call('HGETALL', KEYS[1])
if #rec == 0 then return 0 end
if redis.call('HEXISTS', KEYS[2], 'id') == 0 then
  redis.call('HSET', KEYS[2], unpack(rec))
end
redis.call('DEL', KEYS[1])
return 1
