-- Give a job its terminal state, once, and drop what only a running job needs.
-- KEYS: job, inline, open, leases, attempts, chunk-errors (the job's keys only: one Redis
-- Cluster slot). ARGV: state, result URIs, error (kept if one is already set).
-- Returns the state it had: 'queued' or 'running' when this call ended it, a terminal state
-- when it had ended already (nothing changed), false when there is no such job. The global
-- indexes (finished, active, the tenant's active jobs) are moved after it by the caller
-- (`JobStore._index`), idempotently; the watchdog redoes that if the caller died.
local current = redis.call('HGET', KEYS[1], 'state')
if current == 'queued' or current == 'running' then
  local t = redis.call('TIME')
  local now = t[1] + t[2] / 1e6
  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished_at', now, 'result_uris', ARGV[2])
  if ARGV[3] ~= '' then redis.call('HSETNX', KEYS[1], 'error', ARGV[3]) end
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
end
return current
