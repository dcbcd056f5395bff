-- KEYS: msg counter.  ARGV: now ms, max messages, max age ms, idempotency
-- window ms, prefix, then per message: conversation, "<sender_id>:
-- <client_msg_id>" ('' without client_msg_id), JSON body (an object starting
-- with "ts").  Returns {appended, retries}: appended is one string with a
-- "msg_id:seq" per message, separated by commas ('' for a retry); retries is
-- flat: index, msg id, seq, timestamp, conversation, stored member or '' per
-- message that was appended before.  (One string parses much faster than a
-- nested reply.)

-- How many of a conversation's oldest messages one append checks for age.
local AGE_SCAN = 100

local now = tonumber(ARGV[1])
local max_messages = tonumber(ARGV[2])
local cutoff = now - tonumber(ARGV[3])
local prefix = ARGV[5]
local appended = {}
local retries = {}
local touched = {}
local count = (#ARGV - 5) / 3
-- One INCRBY reserves ids for the whole batch (a retry leaves its id unused).
local first_id = redis.call('INCRBY', KEYS[1], count) - count

local function is_old(member)
  local ts = tonumber(string.match(member, '^{"i":%d+,"q":%d+,"ts":(%d+)'))
  return ts ~= nil and ts < cutoff
end

for i = 1, count do
  local conversation = ARGV[3 + 3 * i]
  local sent_id = ARGV[4 + 3 * i]
  local sent_key = prefix .. 'sent:' .. sent_id
  local sent = false
  if sent_id ~= '' then
    sent = redis.call('GET', sent_key)
  end
  if sent then
    local msg_id, seq, ts, conv = string.match(sent, '^(%d+):(%d+):(%d+):(.*)$')
    local original = redis.call('ZRANGEBYSCORE', prefix .. 'conv:' .. conv,
                                seq, seq)
    for _, v in ipairs({i, msg_id, seq, ts, conv, original[1] or ''}) do
      retries[#retries + 1] = v
    end
    appended[i] = ''
  else
    local conv_key = prefix .. 'conv:' .. conversation
    local msg_id = string.format('%d', first_id + i)
    local seq = string.format('%d',
                              redis.call('INCR', prefix .. 'seq:' .. conversation))
    redis.call('ZADD', conv_key, seq, '{"i":' .. msg_id .. ',"q":' .. seq .. ','
               .. string.sub(ARGV[5 + 3 * i], 2))
    if sent_id ~= '' then
      redis.call('SET', sent_key,
                 msg_id .. ':' .. seq .. ':' .. ARGV[1] .. ':' .. conversation,
                 'PX', ARGV[4])
    end
    touched[conv_key] = true
    appended[i] = msg_id .. ':' .. seq
  end
end

for conv_key in pairs(touched) do
  local excess = redis.call('ZCARD', conv_key) - max_messages
  if excess > 0 then
    redis.call('ZREMRANGEBYRANK', conv_key, 0, excess - 1)
  end
  local head = redis.call('ZRANGE', conv_key, 0, 0)
  if head[1] and is_old(head[1]) then
    local old = 0
    for _, member in ipairs(redis.call('ZRANGE', conv_key, 0, AGE_SCAN - 1)) do
      if not is_old(member) then break end
      old = old + 1
    end
    redis.call('ZREMRANGEBYRANK', conv_key, 0, old - 1)
  end
  redis.call('PEXPIRE', conv_key, ARGV[3])
end
return {table.concat(appended, ','), retries}
