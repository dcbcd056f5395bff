-- KEYS: none (the session keys follow from the prefix).  ARGV: prefix,
-- server, ttl ms, then per session held by that server: user id, session
-- id, user name, device, active (seconds); last, the run_id of this Redis
-- ('': ask it).  Returns {lost, restored}: the session ids that are not
-- their device's session any more (a newer login replaced them, or the
-- device limit dropped them: their server should close them), and those
-- made again (their server should catch them up).
--
-- A session that is still its device's gets its time to live again, and
-- its active time when later than the stored one; one that expired
-- meanwhile (its server could not renew it in time, Redis was away) is
-- made again as it was, connected: its server still holds it.  One that
-- was released or dropped by a newer claim (sessions.lua's bury) is lost,
-- even when its device has no session now.
--
-- One whose device has another session is lost too, unless that record
-- was written by an earlier run of Redis (its 'run' is not this one's: a
-- restored backup, a replica that lagged, a restart) and the held session
-- never ended here: then the record is the older one, from before the
-- login the server holds (that login's claim, and the burial of the
-- record's session, were lost with what the backup missed).  The record's
-- session is ended (deleted and buried, as a newer claim does) and the
-- held one made again.  After a plain restart the records are of an
-- earlier run too, but a session that a newer claim dropped was buried,
-- and the burial survives the restart with the claim: it stays lost.
-- Records without a 'run' (written by an earlier release) are never taken
-- for older.
-- Needs sessions.lua in front.

local prefix, server, ttl = ARGV[1], ARGV[2], ARGV[3]
local run = ARGV[#ARGV]
local lost, restored = {}, {}
if #ARGV > 4 then
  redis.call('SADD', prefix .. 'servers', server)
end
for i = 4, #ARGV - 1, 5 do
  local uid, sid, name, device, active = ARGV[i], ARGV[i + 1], ARGV[i + 2],
                                         ARGV[i + 3], ARGV[i + 4]
  local key = session_key(prefix, uid, device)
  local current = redis.call('HMGET', key, 'session_id', 'active', 'run',
                             'server')
  if current[1] == sid then
    redis.call('PEXPIRE', key, ttl)
    if tonumber(active) > (tonumber(current[2]) or 0) then
      redis.call('HSET', key, 'active', active)
    end
    extend_ttl(devices_key(prefix, uid), ttl)
  elseif ended(prefix, sid) then
    lost[#lost + 1] = sid
  else
    if current[1] then
      run = this_run(run)
      if not current[3] or current[3] == run then
        lost[#lost + 1] = sid
        sid = nil
      else
        delete_session(prefix, uid, device, current[4])
        bury(prefix, current[1])
      end
    end
    if sid then
      run = this_run(run)
      redis.call('HSET', key, 'name', name, 'server', server, 'session_id',
                 sid, 'connected', '1', 'active', active, 'run', run)
      redis.call('PEXPIRE', key, ttl)
      redis.call('SADD', devices_key(prefix, uid), device)
      extend_ttl(devices_key(prefix, uid), ttl)
      redis.call('SADD', prefix .. 'server:' .. server, uid .. ':' .. device)
      redis.call('HSET', prefix .. 'online', uid, name)
      touch(prefix, uid)
      restored[#restored + 1] = sid
    end
  end
end
return {lost, restored}
