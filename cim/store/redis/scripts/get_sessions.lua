-- KEYS: the device sets of users.  ARGV: prefix, connected only (0/1),
-- then the user id of each key.  Returns {index of the key, device, name,
-- server, session id, connected ('0'/'1'), active} per session (only the
-- connected ones when asked so).
-- Needs sessions.lua in front.

local only_connected = ARGV[2] == '1'
local found = {}
for i = 1, #KEYS do
  for _, s in ipairs(live_sessions(ARGV[1], ARGV[i + 2])) do
    if s[5] == '1' or not only_connected then
      found[#found + 1] = {i, unpack(s)}
    end
  end
end
return found
