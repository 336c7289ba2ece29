-- Note on a live job's record that its global indexes are written (`JobStore._index`), so the
-- watchdog need not write them again. KEYS: job. Returns its state now (false: no such job);
-- a job that has ended or is gone since is left as it is, for the caller to index again.
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' or state == 'running' then redis.call('HSET', KEYS[1], 'indexed', '1') end
return state
