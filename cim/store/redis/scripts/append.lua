-- KEYS: msg counter.  ARGV: now ms, max messages, max age ms, idempotency
-- window ms, prefix, sender quota (0: none), a new epoch id, then per
-- message: conversation, sender id, "<sender_id>:<client_msg_id>" ('' without
-- client_msg_id), JSON body (an object starting with "ts"); last, the
-- group feed's spec ('': none; see its block at the end), then the
-- run_id of this Redis as the connection learnt it when it connected ('':
-- unknown, the script asks INFO).  Returns
-- {appended, retries, epochs}: appended is one string with a "msg_id:seq"
-- per message, separated by commas ('' for a retry, 'q' for a message
-- refused by its sender's quota); retries is flat: index, msg id, seq,
-- timestamp, conversation, stored member or '', the conversation's epoch
-- id per message that was appended before; epochs is flat: conversation,
-- epoch id of each conversation appended to.  (One string parses much
-- faster than a nested reply.)
--
-- The quota: a sender appends at most `quota` new messages to one
-- conversation within any max-age window.  Windows are numbered (now /
-- max age); a key per conversation, sender and window counts its messages
-- (written with SET ... PX, expiring after two windows), and the current
-- and previous windows count together.  Messages are counted in order: those past the
-- quota are not appended.
--
-- Epochs: the first append to a conversation that has no epoch record, or
-- whose record was written by another Redis run (its run_id differs: a
-- restart, a restore, a failover), starts a new epoch: the given id, the
-- previous id ('' when none) and the conversation's last seq as its base.
-- The run_id comes from the caller: a connection lives within one run of
-- Redis (a restart closes it), and asks it once (connection.py), which
-- spares an INFO (its whole text built and matched) at every append.
-- Each stored message carries its epoch id ("e", last in its JSON).
--
-- Appending raises each sender's read position in the conversation to its
-- message's seq, and lists a private conversation (p:<low>:<high>) among
-- both users' pairs (when its epoch starts: the hot path spares the two
-- SADDs after that).
-- Needs positions.lua in front.

-- Redis's own cost is mostly its commands (each redis.call costs a few
-- microseconds over its work), so the script reads what the batch needs in
-- few of them: one MGET for every idempotency record, one for every quota
-- count; a conversation's seq before its new epoch is the INCR's reply
-- less one (no GET); its count of messages is only asked (ZCARD) when its
-- oldest message's seq says it may be over max_messages.
-- How many of a conversation's oldest messages one append checks for age.
local AGE_SCAN = 100
local FIRST = 7
local STRIDE = 4

local now = tonumber(ARGV[1])
local max_messages = tonumber(ARGV[2])
local max_age = tonumber(ARGV[3])
local cutoff = now - max_age
local prefix = ARGV[5]
local quota = tonumber(ARGV[6])
local appended = {}
local retries = {}
-- (The last two ARGV: the group feed's spec, see below, and the run_id.)
local count = (#ARGV - FIRST - 2) / STRIDE

-- The values of keys (MGET, a bounded number of keys per call), as a
-- table by key (false for a missing one).
local function mget(keys)
  local values = {}
  for start = 1, #keys, 1000 do
    local last = math.min(start + 999, #keys)
    local got = redis.call('MGET', unpack(keys, start, last))
    for k = start, last do
      values[keys[k]] = got[k - start + 1]
    end
  end
  return values
end

local function is_old(member)
  local ts = tonumber(string.match(member, '^{"i":%d+,"q":%d+,"ts":(%d+)'))
  return ts ~= nil and ts < cutoff
end

-- Every message's idempotency record, read at once (its key by message,
-- made once).
local sent_keys = {}
local sent_key_of = {}
for i = 1, count do
  local sent_id = ARGV[FIRST + STRIDE * (i - 1) + 3]
  if sent_id ~= '' then
    local key = prefix .. 'sent:' .. sent_id
    sent_keys[#sent_keys + 1] = key
    sent_key_of[i] = key
  end
end
local sent = {}
if #sent_keys > 0 then sent = mget(sent_keys) end

-- How many more messages each conversation and sender may append, and how
-- many it appends here; the counts of every pair of the batch read at once.
local budget = {}
local counted = {}
local window = math.floor(now / max_age)
-- The windows' numbers as digits, made once: a number joined to a string
-- is formatted by sprintf each time.
local this_window = ':' .. string.format('%d', window)
local last_window = ':' .. string.format('%d', window - 1)
-- Each message's conversation and sender ("<conversation>:<sender id>").
local pair_of = {}
local counts = {}
if quota > 0 then
  local keys, seen = {}, {}
  for i = 1, count do
    local base = FIRST + STRIDE * (i - 1)
    local pair = ARGV[base + 1] .. ':' .. ARGV[base + 2]
    pair_of[i] = pair
    if not seen[pair] then
      seen[pair] = true
      keys[#keys + 1] = prefix .. 'quota:' .. pair .. this_window
      keys[#keys + 1] = prefix .. 'quota:' .. pair .. last_window
    end
  end
  counts = mget(keys)
end
local function allowed(i)
  if quota <= 0 then return true end
  local pair = pair_of[i]
  local left = budget[pair]
  if left == nil then
    left = quota
        - tonumber(counts[prefix .. 'quota:' .. pair .. this_window] or '0')
        - tonumber(counts[prefix .. 'quota:' .. pair .. last_window] or '0')
  end
  if left <= 0 then
    budget[pair] = left
    return false
  end
  budget[pair] = left - 1
  counted[pair] = (counted[pair] or 0) + 1
  return true
end

-- The epoch of each conversation appended to ({id}; new: it starts here;
-- senders: each sender's highest seq there; first, last: the seqs of its
-- first and last messages here), in the order of their first messages.
local epochs = {}
local order = {}
local run_id = ARGV[#ARGV]
if run_id == '' then run_id = nil end
-- seq: the seq just taken (INCR) by the conversation's first message here.
local function epoch_of(conversation, seq)
  local e = epochs[conversation]
  if e then return e end
  local key = prefix .. 'epoch:' .. conversation
  -- Only the id and the run: a stored epoch of this run is kept as it is
  -- (its previous id and base are not needed here), and the id is a new
  -- one's previous.  (Each field asked costs Redis as much in its reply,
  -- found or not.)
  local rec = redis.call('HMGET', key, 'id', 'run')
  if not run_id then
    run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
  end
  -- (Each table made with all its fields at once: one filled field by
  -- field grows, and so is made again, at each power of two.)
  if rec[1] and rec[2] == run_id then
    e = {rec[1], senders = {}, new = false, first = seq, last = seq}
  else
    e = {ARGV[7], senders = {}, new = true, first = seq, last = seq}
    redis.call('HSET', key, 'id', e[1], 'previous', rec[1] or '',
               'base', string.format('%d', seq - 1), 'run', run_id)
  end
  epochs[conversation] = e
  order[#order + 1] = conversation
  return e
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
    original = just_sent[sent_id] or sent[sent_key_of[i]]
  end
  if original then
    local msg_id, seq, ts, conv = string.match(original,
                                               '^(%d+):(%d+):(%d+):(.*)$')
    local member = redis.call('ZRANGEBYSCORE', prefix .. 'conv:' .. conv,
                              seq, seq)
    local epoch = epochs[conv]
    epoch = epoch and epoch[1]
        or redis.call('HGET', prefix .. 'epoch:' .. conv, 'id') or ''
    for _, v in ipairs({i, msg_id, seq, ts, conv, member[1] or '', epoch}) do
      retries[#retries + 1] = v
    end
    appended[i] = ''
  elseif not allowed(i) then
    appended[i] = 'q'
  else
    local n = redis.call('INCR', prefix .. 'seq:' .. conversation)
    local e = epoch_of(conversation, n)
    local msg_id = string.format('%d', first_id + i)
    local seq = string.format('%d', n)
    redis.call('ZADD', prefix .. 'conv:' .. conversation, seq,
               '{"i":' .. msg_id .. ',"q":' .. seq .. ','
               .. string.sub(ARGV[base + 4], 2, -2) .. ',"e":"' .. e[1] .. '"}')
    if sent_id ~= '' then
      local record = msg_id .. ':' .. seq .. ':' .. ARGV[1] .. ':' .. conversation
      redis.call('SET', sent_key_of[i], record, 'PX', ARGV[4])
      just_sent[sent_id] = record
    end
    e.senders[ARGV[base + 2]] = seq
    e.last = n
    appended[i] = msg_id .. ':' .. seq
  end
end

-- The window's count, read above, plus this batch's (as INCRBY would, and
-- its expiry renewed as PEXPIRE would), in one command.
local quota_ttl = string.format('%d', 2 * max_age)
for pair, n in pairs(counted) do
  local key = prefix .. 'quota:' .. pair .. this_window
  redis.call('SET', key, string.format('%d', tonumber(counts[key] or '0') + n),
             'PX', quota_ttl)
end

-- A pair conversation's two users, or nil (as cim.message.pair_members).
local function pair_members(conversation)
  local low, high = string.match(conversation, '^p:([1-9]%d*):([1-9]%d*)$')
  if not low then return nil end
  if #low > #high or (#low == #high and low > high) then return nil end
  return low, high
end

local epoch_ids = {}
for _, conversation in ipairs(order) do
  local e = epochs[conversation]
  epoch_ids[#epoch_ids + 1] = conversation
  epoch_ids[#epoch_ids + 1] = e[1]
  -- A sender's message is the conversation's last: its seq is above any
  -- read position of the epoch (they are at most the last seq), and above
  -- the base of a new one, so it raises the sender's without reading it
  -- (every sender's in one HSET).
  -- (One sender, the usual case, needs no table of arguments.)
  local sender, seq = next(e.senders)
  if next(e.senders, sender) == nil then
    if e[1] ~= '' then seq = e[1] .. ':' .. seq end
    redis.call('HSET', prefix .. 'read:' .. conversation, sender, seq)
  else
    local read = {}
    for sender, seq in pairs(e.senders) do
      read[#read + 1] = sender
      if e[1] == '' then
        read[#read + 1] = seq
      else
        read[#read + 1] = e[1] .. ':' .. seq
      end
    end
    redis.call('HSET', prefix .. 'read:' .. conversation, unpack(read))
  end
  -- Listed among its users' pairs when its epoch starts: at its first
  -- message, and again after Redis lost or replaced anything.
  local low, high = nil, nil
  if e.new then low, high = pair_members(conversation) end
  if low then
    redis.call('SADD', prefix .. 'pairs:' .. low, conversation)
    redis.call('SADD', prefix .. 'pairs:' .. high, conversation)
  end
  local conv_key = prefix .. 'conv:' .. conversation
  -- Every stored message has its own seq, at most the last one: from the
  -- oldest one's seq on, at most last - oldest + 1 messages are stored, so
  -- only a conversation that may hold more than max_messages is counted.
  -- A conversation whose first message ever is in this batch (its seq 1:
  -- the counter never expires) holds only this batch's: nothing to drop.
  local head, oldest = nil, e.first
  if e.first ~= 1 or e.last > max_messages then
    head = redis.call('ZRANGE', conv_key, 0, 0)[1]
    oldest = head and tonumber(string.match(head, '^{"i":%d+,"q":(%d+),'))
  end
  if not oldest or e.last - oldest + 1 > max_messages then
    local excess = redis.call('ZCARD', conv_key) - max_messages
    if excess > 0 then
      redis.call('ZREMRANGEBYRANK', conv_key, 0, excess - 1)
      head = redis.call('ZRANGE', conv_key, 0, 0)[1]
    end
  end
  if head and is_old(head) then
    local old = 0
    for _, member in ipairs(redis.call('ZRANGE', conv_key, 0, AGE_SCAN - 1)) do
      if not is_old(member) then break end
      old = old + 1
    end
    redis.call('ZREMRANGEBYRANK', conv_key, 0, old - 1)
  end
  redis.call('PEXPIRE', conv_key, ARGV[3])
end
-- The group feed (cim.store.redis.store, append's feed): the messages
-- appended here that their sender's server asked to be fanned out are
-- published, in the order they are stored, to every server that holds
-- sessions (the servers set), one payload per server: so every server
-- gets a group's messages in seq order, whichever server sent them.
-- The spec: the channels' prefix, a line of one number per message of the
-- batch (its recipients' list, 0: not fed), then the lists (user ids
-- joined by commas).  The payload: a NUL line, the lists as "U<ids>"
-- lines, then per message fed "<list>\t<conversation>\t<stored member>".
local feed = ARGV[#ARGV - 1]
if feed ~= '' then
  local lines = {}
  for line in string.gmatch(feed, '[^\n]+') do lines[#lines + 1] = line end
  local out = {'\0'}
  for k = 3, #lines do out[#out + 1] = 'U' .. lines[k] end
  local fed = #out
  local i = 0
  for ref in string.gmatch(lines[2], '%d+') do
    i = i + 1
    local ids = appended[i]
    if ref ~= '0' and ids ~= '' and ids ~= 'q' then
      local base = FIRST + STRIDE * (i - 1)
      local conversation = ARGV[base + 1]
      local msg_id, seq = string.match(ids, '^(%d+):(%d+)$')
      out[#out + 1] = ref .. '\t' .. conversation .. '\t{"i":' .. msg_id
          .. ',"q":' .. seq .. ',' .. string.sub(ARGV[base + 4], 2, -2)
          .. ',"e":"' .. epochs[conversation][1] .. '"}'
    end
  end
  if #out > fed then
    local payload = table.concat(out, '\n')
    for _, server in ipairs(redis.call('SMEMBERS', prefix .. 'servers')) do
      redis.call('PUBLISH', lines[1] .. server, payload)
    end
  end
end

return {table.concat(appended, ','), retries, epoch_ids}
