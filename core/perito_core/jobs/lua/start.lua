-- Move a job from queued to running, once. KEYS: job, state counts.
if redis.call('HGET', KEYS[1], 'state') == 'queued' then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', t[1] + t[2] / 1e6)
  redis.call('HINCRBY', KEYS[2], 'queued', -1)
  redis.call('HINCRBY', KEYS[2], 'running', 1)
end
return redis.call('HGET', KEYS[1], 'state')
