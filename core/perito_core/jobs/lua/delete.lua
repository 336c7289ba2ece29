-- Delete a terminal job. KEYS: job, state counts, jobs, finished jobs, active jobs, the
-- tenant's jobs, the job-data purge queue, then every per-job key. ARGV: the job id, now
-- (Unix seconds, the caller's clock, as the purge queue's other scores).
-- Returns the state it had, or false if it was not terminal (nothing deleted); 'gone' if
-- there is no such job. The job's data prefix (`data_uri`) joins the purge queue, due now.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'gone' end
if state == 'queued' or state == 'running' then return false end
local data = redis.call('HGET', KEYS[1], 'data_uri')
if data and data ~= '' then redis.call('ZADD', KEYS[7], ARGV[2], data) end
redis.call('HINCRBY', KEYS[2], state, -1)
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], KEYS[1])
redis.call('ZREM', KEYS[5], KEYS[1])
redis.call('ZREM', KEYS[6], ARGV[1])
for i = 8, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('DEL', KEYS[1])
return state
