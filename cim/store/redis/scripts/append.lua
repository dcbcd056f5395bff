-- KEYS: msg counter.  ARGV: now ms, max messages, max age ms, idempotency
-- window ms, prefix, sender quota (0: none), a new epoch id, then per
-- message: conversation, sender id, what follows "sent:" in its
-- idempotency record's key ("{<conversation>}:<sender_id>:<client_msg_id>",
-- cim.store.redis.layout.sent_id; '' without client_msg_id), JSON body
-- (an object starting with "ts", without its braces: the script writes
-- its ids before it and its epoch after); last, the
-- group feed's spec ('': none; see its block at the end), then the
-- run_id of this Redis as the connection learnt it when it connected ('':
-- unknown, the script asks INFO).  Returns
-- {appended, retries, epochs}: appended is one string with the msg_id and
-- seq of each message, all separated by commas ('' and '' for a retry,
-- 'q' and '' for a message refused by its sender's quota); retries is flat: index, msg id, seq,
-- timestamp, conversation, stored member or '', the conversation's epoch
-- id per message that was appended before; epochs is flat: conversation,
-- epoch id of each conversation appended to that kept its stored epoch
-- (any other started the new epoch id given: most of a busy server's
-- batches begin conversations, and list none).  (One string parses much
-- faster than a nested reply.)  A fourth, generations (one string): see
-- the block "Session generations" at the end.
--
-- The quota: a sender appends at most `quota` new messages to one
-- conversation within any max-age window.  Windows are numbered (now /
-- max age); the conversation's hash keeps each sender's count of the
-- current window and of the one before, which count together.  Messages
-- are counted in order: those past the quota are not appended.
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
-- microseconds over its work, a write as much again in its copy to the
-- append-only file, each argument a little), so the script reads what the
-- batch needs in few of them: one EXISTS for every idempotency record
-- (and an MGET of them only when one is there), one
-- HMGET per known conversation for its epoch and quota count; it writes a
-- conversation's epoch, read positions and quota counts in one HSET; a
-- conversation's seq before its new epoch is the INCR's reply less one
-- (no GET); its count of messages is only asked (ZCARD) when its oldest
-- message's seq says it may be over max_messages.
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
-- The conversations of the retries (their users' generations).
local retried = {}
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
-- (Most batches hold no retry: one EXISTS, one number in its reply,
-- spares the MGET's reply of a missing value per message.)
local sent = {}
if #sent_keys > 0 then
  local found = 0
  for start = 1, #sent_keys, 1000 do
    found = found + redis.call('EXISTS',
                               unpack(sent_keys, start,
                                      math.min(start + 999, #sent_keys)))
  end
  if found > 0 then sent = mget(sent_keys) end
end

-- A conversation's hash (read:<conversation>) holds its epoch record
-- (id, previous, base, run), its users' read positions (a field per user
-- id) and its senders' quota counts ("q:<sender id>" -> "<window>:<count>:
-- <previous window's count>"), all written by one HSET per conversation
-- and batch.  A conversation whose seq counter starts here (its INCR
-- answers 1: the counter never expires) has nothing there worth reading:
-- its first message reads nothing.  Any other reads its epoch's id and run
-- and its first sender's count in one HMGET after the INCR of its seq
-- (another sender's count, in one HGET), and gives the seq back (DECR,
-- within the script: nobody sees it) when the message is refused.
local window = math.floor(now / max_age)
-- The window's number as digits, made once: a number joined to a string
-- is formatted by sprintf each time.
local this_window = string.format('%d', window)
local last_window = string.format('%d', window - 1)
-- A count's digits (the usual small ones without sprintf).
local DIGITS = {[0] = '0', '1', '2', '3', '4', '5', '6', '7', '8', '9'}
local function digits(n)
  return DIGITS[n] or string.format('%d', n)
end
-- Per conversation appended to in this batch: its state ({id}: its
-- epoch, once its first message is appended; key: its hash; stored_id,
-- stored_run: its stored epoch's; new: its epoch starts here (previous,
-- base: the new record's); fresh: its seq started here; sender, seq: its
-- one sender's highest seq, or senders: each sender's when more than
-- one; first, last: the seqs of its first and last messages here; low,
-- high: a pair conversation's users; qs: its first sender, whose quota is
-- left, count (this window's), prev (the previous one's); quota: any
-- other sender's, {left, count, previous}; conv: its messages' key).  Its fields are the slots
-- of an array (a table's array costs Redis a third of as many named
-- fields), each made with the table (false until known): a field added
-- later grows the table.
local KEY, FRESH, NEW, FIRST_SEQ, LAST_SEQ, SENDER, SEQ, SENDERS, STORED_ID,
    STORED_RUN, PREVIOUS, BASE, LOW, HIGH, QS, LEFT, COUNT, PREV, QUOTA,
    CONV = 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
    20, 21
local epochs = {}
local order = {}
local run_id = ARGV[#ARGV]
if run_id == '' then run_id = nil end

-- A sender's quota state from its stored count (nil: none): left, count
-- in this window, count of the previous one.
local function parse_quota(stored)
  local count, previous = 0, 0
  if stored then
    local w, n, p = string.match(stored, '^(%d+):(%d+):(%d+)$')
    if w == this_window then
      count, previous = tonumber(n), tonumber(p)
    elseif w == last_window then
      previous = tonumber(n)
    end
  end
  return quota - count - previous, count, previous
end

-- Starts conversation's state in this batch at seq (just taken by INCR)
-- for sender's message.
local function state_of(conversation, seq, sender)
  local low, high = string.match(conversation, '^p:([1-9]%d*):([1-9]%d*)$')
  local c = {false, conversation_key(prefix, 'read', conversation),
             seq == 1, false,
             false, false, false, false, false, false, false, false, false,
             low or false, high or false, false, quota, 0, 0, false,
             conversation_key(prefix, 'conv', conversation)}
  if quota > 0 then c[QS] = sender end
  if c[FRESH] then
    -- (Nothing stored: see above.)
  elseif quota > 0 then
    local rec = redis.call('HMGET', c[KEY], 'id', 'run', 'q:' .. sender)
    c[STORED_ID], c[STORED_RUN] = rec[1], rec[2]
    c[LEFT], c[COUNT], c[PREV] = parse_quota(rec[3])
  else
    local rec = redis.call('HMGET', c[KEY], 'id', 'run')
    c[STORED_ID], c[STORED_RUN] = rec[1], rec[2]
  end
  epochs[conversation] = c
  return c
end

-- Counts sender's message in conversation c against its quota: false
-- when the quota refuses it.
local function take_quota(c, sender)
  if c[QS] == sender then
    if c[LEFT] <= 0 then return false end
    c[LEFT], c[COUNT] = c[LEFT] - 1, c[COUNT] + 1
    return true
  end
  local q = c[QUOTA] and c[QUOTA][sender]
  if not q then
    if c[FRESH] then
      q = {quota, 0, 0}
    else
      q = {parse_quota(redis.call('HGET', c[KEY], 'q:' .. sender))}
    end
    if not c[QUOTA] then c[QUOTA] = {} end
    c[QUOTA][sender] = q
  end
  if q[1] <= 0 then return false end
  q[1], q[2] = q[1] - 1, q[2] + 1
  return true
end

-- Sender's stored quota count in conversation c (its field's value).
local function quota_value(c, sender)
  local count, previous = c[COUNT], c[PREV]
  if c[QS] ~= sender then
    local q = c[QUOTA][sender]
    count, previous = q[2], q[3]
  end
  return this_window .. ':' .. digits(count) .. ':' .. digits(previous)
end

-- Learns conversation c's epoch (at its first appended message, seq): a
-- stored epoch of this run is kept as it is, any other followed by a new
-- one (written with the read positions).
local function start_epoch(conversation, c, seq)
  if not run_id then
    run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
  end
  c[FIRST_SEQ] = seq
  order[#order + 1] = conversation
  if c[STORED_ID] and c[STORED_RUN] == run_id then
    c[1] = c[STORED_ID]
  else
    -- (A conversation's first message ever has no record worth reading: a
    -- stray one's id, as previous with base 0, would vouch for no seq.)
    c[1], c[NEW] = ARGV[7], true
    if c[FRESH] then
      c[PREVIOUS], c[BASE] = '', '0'
    else
      c[PREVIOUS], c[BASE] = c[STORED_ID] or '', string.format('%d', seq - 1)
    end
  end
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
    -- (Its key names its conversation, this message's; records written
    -- before this release still end with it.)
    local conv = conversation
    local msg_id, seq, ts = string.match(original, '^(%d+):(%d+):(%d+)')
    local member = redis.call('ZRANGEBYSCORE',
                              conversation_key(prefix, 'conv', conv),
                              seq, seq)
    local epoch = epochs[conv]
    epoch = epoch and epoch[FIRST_SEQ] and epoch[1]
        or redis.call('HGET', conversation_key(prefix, 'read', conv), 'id') or ''
    for _, v in ipairs({i, msg_id, seq, ts, conv, member[1] or '', epoch}) do
      retries[#retries + 1] = v
    end
    retried[#retried + 1] = conv
    appended[2 * i - 1], appended[2 * i] = '', ''
  else
    local sender = ARGV[base + 2]
    local c = epochs[conversation]
    local n = nil
    if not c then
      n = redis.call('INCR', conversation_key(prefix, 'seq', conversation))
      c = state_of(conversation, n, sender)
    end
    if quota > 0 and not take_quota(c, sender) then
      if n then redis.call('DECR', conversation_key(prefix, 'seq', conversation)) end
      appended[2 * i - 1], appended[2 * i] = 'q', ''
    else
      if not n then
        n = redis.call('INCR', conversation_key(prefix, 'seq', conversation))
      end
      if not c[FIRST_SEQ] then start_epoch(conversation, c, n) end
      local msg_id = string.format('%d', first_id + i)
      local seq = digits(n)
      redis.call('ZADD', c[CONV], seq,
                 '{"i":' .. msg_id .. ',"q":' .. seq .. ','
                 .. ARGV[base + 4] .. ',"e":"' .. c[1] .. '"}')
      if sent_id ~= '' then
        local record = msg_id .. ':' .. seq .. ':' .. ARGV[1]
        redis.call('SET', sent_key_of[i], record, 'PX', ARGV[4])
        just_sent[sent_id] = record
      end
      -- (One sender, the usual case, needs no table of senders.)
      if c[SENDERS] then
        c[SENDERS][sender] = seq
      elseif not c[SENDER] or c[SENDER] == sender then
        c[SENDER], c[SEQ] = sender, seq
      else
        c[SENDERS] = {[c[SENDER]] = c[SEQ], [sender] = seq}
      end
      c[LAST_SEQ] = n
      appended[2 * i - 1], appended[2 * i] = msg_id, seq
    end
  end
end

local epoch_ids = {}
for _, conversation in ipairs(order) do
  local e = epochs[conversation]
  if not e[NEW] then
    epoch_ids[#epoch_ids + 1] = conversation
    epoch_ids[#epoch_ids + 1] = e[1]
  end
  -- A sender's message is the conversation's last: its seq is above any
  -- read position of the epoch (they are at most the last seq), and above
  -- the base of a new one, so it raises the sender's without reading it:
  -- every sender's, with their quota counts and a new epoch's record, in
  -- one HSET.  (One sender of a known epoch, the usual case, needs no
  -- table of arguments.)
  if not e[SENDERS] then
    local sender = e[SENDER]
    local position = e[SEQ]
    if e[1] ~= '' then position = e[1] .. ':' .. position end
    local q = quota > 0 and quota_value(e, sender)
    if not e[NEW] then
      if q then
        redis.call('HSET', e[KEY], sender, position, 'q:' .. sender, q)
      else
        redis.call('HSET', e[KEY], sender, position)
      end
    elseif q and e[FRESH] then
      -- (Neither previous nor base: without them the base is 0, and a
      -- previous epoch with base 0 vouches for no seq.)
      redis.call('HSET', e[KEY], 'id', e[1], 'run', run_id,
                 sender, position, 'q:' .. sender, q)
    elseif q then
      redis.call('HSET', e[KEY], 'id', e[1], 'previous', e[PREVIOUS],
                 'base', e[BASE], 'run', run_id, sender, position,
                 'q:' .. sender, q)
    else
      redis.call('HSET', e[KEY], 'id', e[1], 'previous', e[PREVIOUS],
                 'base', e[BASE], 'run', run_id, sender, position)
    end
  else
    local prefix_id = ''
    if e[1] ~= '' then prefix_id = e[1] .. ':' end
    local fields = {}
    if e[NEW] then
      fields = {'id', e[1], 'previous', e[PREVIOUS], 'base', e[BASE],
                'run', run_id}
    end
    for sender, seq in pairs(e[SENDERS]) do
      fields[#fields + 1] = sender
      fields[#fields + 1] = prefix_id .. seq
      if quota > 0 then
        fields[#fields + 1] = 'q:' .. sender
        fields[#fields + 1] = quota_value(e, sender)
      end
    end
    redis.call('HSET', e[KEY], unpack(fields))
  end
  -- Listed among its users' pairs when its epoch starts: at its first
  -- message, and again after Redis lost or replaced anything.
  -- (A pair conversation's users in order, as cim.message.pair_members.)
  local low, high = e[LOW], e[HIGH]
  if e[NEW] and low and not (#low > #high or (#low == #high and low > high)) then
    redis.call('SADD', user_key(prefix, 'pairs', low), conversation)
    redis.call('SADD', user_key(prefix, 'pairs', high), conversation)
  end
  local conv_key = e[CONV]
  -- Every stored message has its own seq, at most the last one: from the
  -- oldest one's seq on, at most last - oldest + 1 messages are stored, so
  -- only a conversation that may hold more than max_messages is counted.
  -- A conversation whose first message ever is in this batch (its seq 1:
  -- the counter never expires) holds only this batch's: nothing to drop.
  local head, oldest = nil, e[FIRST_SEQ]
  if e[FIRST_SEQ] ~= 1 or e[LAST_SEQ] > max_messages then
    head = redis.call('ZRANGE', conv_key, 0, 0)[1]
    oldest = head and tonumber(string.match(head, '^{"i":%d+,"q":(%d+),'))
  end
  if not oldest or e[LAST_SEQ] - oldest + 1 > max_messages then
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

-- Session generations (cim.delivery's session cache; sessions.lua's
-- generation_key): one string, the run_id the connection gave, then user
-- id and session generation of each user of the batch's private
-- conversations, read after the messages are stored (one MGET), all
-- separated by commas ('' without a run_id; ids as written, without
-- leading zeros).  A server whose copy of a user's sessions has that
-- generation (in that run) holds what a lookup now would read, and skips
-- it.
local generations = ''
if ARGV[#ARGV] ~= '' then
  -- The users of each conversation's state, then of the retries' other
  -- conversations.  (A user of several conversations is read and listed
  -- once for each, which costs less than a table of those seen: the
  -- caller reads them as one.)
  local users, keys = {}, {}
  local function add(low, high)
    if low then
      local n = #users
      users[n + 1], users[n + 2] = low, high
      keys[n + 1] = user_key(prefix, 'sgen', low)
      keys[n + 2] = user_key(prefix, 'sgen', high)
    end
  end
  for _, c in pairs(epochs) do add(c[LOW], c[HIGH]) end
  local listed = {}
  for _, conversation in ipairs(retried) do
    if not epochs[conversation] and not listed[conversation] then
      listed[conversation] = true
      add(string.match(conversation, '^p:([1-9]%d*):([1-9]%d*)$'))
    end
  end
  if #keys > 0 then
    local got = redis.call('MGET', unpack(keys))
    local flat = {ARGV[#ARGV]}
    for k = 1, #keys do
      flat[2 * k], flat[2 * k + 1] = users[k], got[k] or '0'
    end
    generations = table.concat(flat, ',')
  end
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
    local msg_id, seq = appended[2 * i - 1], appended[2 * i]
    if ref ~= '0' and seq ~= '' then
      local base = FIRST + STRIDE * (i - 1)
      local conversation = ARGV[base + 1]
      out[#out + 1] = ref .. '\t' .. conversation .. '\t{"i":' .. msg_id
          .. ',"q":' .. seq .. ',' .. ARGV[base + 4]
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

return {table.concat(appended, ','), retries, epoch_ids, generations}
