-- Give a job its terminal state, once, and drop what only a running job needs.
-- KEYS: job, state counts, active jobs, finished jobs, inline, open, leases, attempts, errors,
-- the tenant's active jobs. ARGV: state, result URIs, error (kept if one is already set), id.
local current = redis.call('HGET', KEYS[1], 'state')
if current == 'queued' or current == 'running' then
  local t = redis.call('TIME')
  local now = t[1] + t[2] / 1e6
  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished_at', now, 'result_uris', ARGV[2])
  if ARGV[3] ~= '' then redis.call('HSETNX', KEYS[1], 'error', ARGV[3]) end
  redis.call('HINCRBY', KEYS[2], current, -1)
  redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
  redis.call('ZREM', KEYS[3], KEYS[1])
  redis.call('ZADD', KEYS[4], now, KEYS[1])
  redis.call('DEL', KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9])
  redis.call('ZREM', KEYS[10], ARGV[4])
end
return current
