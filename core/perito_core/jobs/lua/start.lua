-- Move a job from queued to running, once. KEYS: job. Returns its state after (false: no
-- such job). The job's keys only: its state's global indexes do not change (`JobStore._index`).
if redis.call('HGET', KEYS[1], 'state') == 'queued' then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', t[1] + t[2] / 1e6)
end
return redis.call('HGET', KEYS[1], 'state')
