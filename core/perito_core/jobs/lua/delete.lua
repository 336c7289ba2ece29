-- Delete a terminal job. KEYS: job, state counts, jobs, finished jobs, active jobs, the
-- tenant's jobs, then every per-job key. Returns the state it had, or false if it was not
-- terminal (nothing deleted).
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'gone' end
if state == 'queued' or state == 'running' then return false end
redis.call('HINCRBY', KEYS[2], state, -1)
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], KEYS[1])
redis.call('ZREM', KEYS[5], KEYS[1])
redis.call('ZREM', KEYS[6], ARGV[1])
for i = 7, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('DEL', KEYS[1])
return state
