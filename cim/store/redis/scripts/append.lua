-- KEYS: msg counter.  ARGV: now ms, max messages, max age ms, idempotency
-- window ms, prefix, sender quota (0: none), then per message:
-- conversation, sender id, "<sender_id>:<client_msg_id>" ('' without
-- client_msg_id), JSON body (an object starting with "ts").  Returns
-- {appended, retries}: appended is one string with a "msg_id:seq" per
-- message, separated by commas ('' for a retry, 'q' for a message refused
-- by its sender's quota); retries is flat: index, msg id, seq, timestamp,
-- conversation, stored member or '' per message that was appended before.
-- (One string parses much faster than a nested reply.)
--
-- The quota: a sender appends at most `quota` new messages to one
-- conversation within any max-age window.  Windows are numbered (now /
-- max age); a key per conversation, sender and window counts its messages
-- (INCRBY, expiring after two windows), and the current and previous
-- windows count together.  Messages are counted in order: those past the
-- quota are not appended.

-- How many of a conversation's oldest messages one append checks for age.
local AGE_SCAN = 100
local FIRST = 6
local STRIDE = 4

local now = tonumber(ARGV[1])
local max_messages = tonumber(ARGV[2])
local max_age = tonumber(ARGV[3])
local cutoff = now - max_age
local prefix = ARGV[5]
local quota = tonumber(ARGV[6])
local appended = {}
local retries = {}
local touched = {}
local count = (#ARGV - FIRST) / STRIDE

local function is_old(member)
  local ts = tonumber(string.match(member, '^{"i":%d+,"q":%d+,"ts":(%d+)'))
  return ts ~= nil and ts < cutoff
end

-- How many more messages each conversation and sender may append (read
-- when first needed), and how many it appends here.
local budget = {}
local counted = {}
local window = math.floor(now / max_age)
local function quota_key(pair, w)
  return prefix .. 'quota:' .. pair .. ':' .. w
end
local function allowed(pair)
  if quota <= 0 then return true end
  if budget[pair] == nil then
    budget[pair] = quota
        - tonumber(redis.call('GET', quota_key(pair, window)) or '0')
        - tonumber(redis.call('GET', quota_key(pair, window - 1)) or '0')
  end
  if budget[pair] <= 0 then return false end
  budget[pair] = budget[pair] - 1
  counted[pair] = (counted[pair] or 0) + 1
  return true
end

-- One INCRBY reserves ids for the whole batch (a retry leaves its id unused).
local first_id = redis.call('INCRBY', KEYS[1], count) - count
-- Within the batch, a sent id appended already.
local just_sent = {}

for i = 1, count do
  local base = FIRST + STRIDE * (i - 1)
  local conversation = ARGV[base + 1]
  local sent_id = ARGV[base + 3]
  local original = false
  if sent_id ~= '' then
    original = just_sent[sent_id] or redis.call('GET', prefix .. 'sent:' .. sent_id)
  end
  if original then
    local msg_id, seq, ts, conv = string.match(original,
                                               '^(%d+):(%d+):(%d+):(.*)$')
    local member = redis.call('ZRANGEBYSCORE', prefix .. 'conv:' .. conv,
                              seq, seq)
    for _, v in ipairs({i, msg_id, seq, ts, conv, member[1] or ''}) do
      retries[#retries + 1] = v
    end
    appended[i] = ''
  elseif not allowed(conversation .. ':' .. ARGV[base + 2]) then
    appended[i] = 'q'
  else
    local conv_key = prefix .. 'conv:' .. conversation
    local msg_id = string.format('%d', first_id + i)
    local seq = string.format('%d',
                              redis.call('INCR', prefix .. 'seq:' .. conversation))
    redis.call('ZADD', conv_key, seq, '{"i":' .. msg_id .. ',"q":' .. seq .. ','
               .. string.sub(ARGV[base + 4], 2))
    if sent_id ~= '' then
      local record = msg_id .. ':' .. seq .. ':' .. ARGV[1] .. ':' .. conversation
      redis.call('SET', prefix .. 'sent:' .. sent_id, record, 'PX', ARGV[4])
      just_sent[sent_id] = record
    end
    touched[conv_key] = true
    appended[i] = msg_id .. ':' .. seq
  end
end

for pair, n in pairs(counted) do
  local key = quota_key(pair, window)
  redis.call('INCRBY', key, n)
  redis.call('PEXPIRE', key, 2 * max_age)
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
