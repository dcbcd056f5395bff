-- Moves messages of a previous release's private inbox (u:<owner>, which
-- held the messages others sent to its owner) into the pair conversation
-- of the owner and one peer (cim.store.redis.migrate).
-- KEYS: the inbox, the pair conversation, its seq counter, its epoch
-- record, its read positions, the owner's pairs, the peer's pairs.
-- ARGV: owner id, peer id, a new epoch id, the owner's cursor in its inbox
-- (0: none), the pair conversation's id, then the inbox's messages that
-- the peer sent, as stored.
--
-- The messages still in the inbox are taken out of it and merged with the
-- pair conversation's messages in msg id order, numbered again from 1 in a
-- new epoch (previous: the conversation's epoch, base 0), keeping its
-- time to live (the longer of the two).  Each user's read position is the
-- last message it sent or had read: its own, those of the inbox up to its
-- cursor there, those of the conversation up to its read position.
-- Returns how many messages were taken (0: none was left, nothing changed).
-- Needs positions.lua in front.

local owner, peer, cursor = ARGV[1], ARGV[2], tonumber(ARGV[4])
local ttl = math.max(redis.call('PTTL', KEYS[1]), redis.call('PTTL', KEYS[2]))
local messages = {}
local function add(member, read_by)
  local id, q, sender = string.match(member, '^{"i":(%d+),"q":(%d+),"ts":%d+,"s":(%d+)')
  if not id then return end
  local by = {[sender] = true}
  for user, up_to in pairs(read_by) do
    if tonumber(q) <= up_to then by[user] = true end
  end
  messages[#messages + 1] = {id, member, by}
end

local taken = 0
for i = 6, #ARGV do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    add(ARGV[i], {[owner] = cursor})
    taken = taken + 1
  end
end
if taken == 0 then return 0 end

local e = current_epoch(KEYS[4], KEYS[3])
local read_by = {}
for _, user in ipairs({owner, peer}) do
  read_by[user] = resume(redis.call('HGET', KEYS[5], user), e)
end
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  add(member, read_by)
end
table.sort(messages, function(a, b) return tonumber(a[1]) < tonumber(b[1]) end)

local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
local epoch = ARGV[3]
redis.call('HSET', KEYS[4], 'id', epoch, 'previous', e[1], 'base', 0,
           'run', run_id)
redis.call('DEL', KEYS[2])
local read = {[owner] = 0, [peer] = 0}
for n, m in ipairs(messages) do
  local body = string.match(m[2], '^{"i":%d+,"q":%d+,(.*)}$')
  body = string.gsub(body, ',"e":"[^"]*"$', '')
  local seq = string.format('%d', n)
  redis.call('ZADD', KEYS[2], seq, '{"i":' .. m[1] .. ',"q":' .. seq .. ','
             .. body .. ',"e":"' .. epoch .. '"}')
  for user in pairs(m[3]) do
    if read[user] then read[user] = n end
  end
end
redis.call('SET', KEYS[3], #messages)
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
for user, n in pairs(read) do
  if n > 0 then
    redis.call('HSET', KEYS[5], user, format_position(epoch, n))
  else
    redis.call('HDEL', KEYS[5], user)
  end
end
redis.call('SADD', KEYS[6], ARGV[5])
redis.call('SADD', KEYS[7], ARGV[5])
return taken
