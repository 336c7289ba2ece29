-- Delete a terminal job's keys. KEYS: the job's record, then every other key of the job (one
-- Redis Cluster slot). Returns the state it had, or false if it was not terminal (nothing
-- deleted); 'gone' if there is no such job. Its global indexes and the purge of its data are
-- the caller's, before and after this script (`JobStore.delete`).
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'gone' end
if state == 'queued' or state == 'running' then return false end
redis.call('DEL', unpack(KEYS))
return state
