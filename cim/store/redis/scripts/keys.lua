-- Not a script of its own: put in front of every script that names keys
-- itself (scripts/__init__.py).  The key layout, as cim.store.redis.layout
-- declares it: a key that belongs to a user, a conversation or a group
-- carries its owner as a hash tag ({7}, {p:1:2}, {g:team}).

-- A user's key of kind (e.g. 'pairs'): prefix .. 'pairs:{7}'.
local function user_key(prefix, kind, uid)
  return prefix .. kind .. ':{' .. uid .. '}'
end

-- A conversation's key of kind (e.g. 'conv'): prefix .. 'conv:{p:1:2}'.
local function conversation_key(prefix, kind, conversation)
  return prefix .. kind .. ':{' .. conversation .. '}'
end

-- A group's key of kind (e.g. 'joined'): tagged with its conversation.
local function group_key(prefix, kind, group_id)
  return prefix .. kind .. ':{g:' .. group_id .. '}'
end
