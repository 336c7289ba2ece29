-- Close a chunk whose part a worker has written: record which part counts and its tallies,
-- move the job's counters, drop what only a running chunk needs.
-- KEYS: job, open, leases, attempts, chunk-errors, chunks (slots), inline.
-- ARGV: chunk, holder, attempt, succeeded, failed, index of its first item, its items.
-- Returns {outcome, succeeded, failed, cancelled, total} (the job's counters after):
-- 'recorded'; 'lost' (the lease is not the holder's: it lapsed and another worker took the
-- chunk, or Redis lost it; the part is never referred to); 'done' (the chunk was closed
-- already: recorded, cancelled or failed); 'terminal' or 'gone' (the job ended, or is gone).
local function counters(outcome)
  local v = redis.call('HMGET', KEYS[1], 'succeeded', 'failed', 'cancelled', 'total')
  return {outcome, tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0,
    tonumber(v[4]) or 0}
end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'gone', 0, 0, 0, 0} end
if state ~= 'queued' and state ~= 'running' then return counters('terminal') end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return counters('done') end
local lease = redis.call('HGET', KEYS[3], ARGV[1])
if not lease or string.match(lease, '^(.*) %d+$') ~= ARGV[2] then return counters('lost') end
local chunk = tonumber(ARGV[1])
redis.call('BITFIELD', KEYS[6], 'SET', 'u16', '#' .. (2 * chunk), ARGV[3],
  'SET', 'u16', '#' .. (2 * chunk + 1), ARGV[5])
redis.call('HINCRBY', KEYS[1], 'succeeded', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'failed', ARGV[5])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
if redis.call('EXISTS', KEYS[7]) == 1 then
  for i = tonumber(ARGV[6]), tonumber(ARGV[6]) + tonumber(ARGV[7]) - 1 do
    redis.call('HDEL', KEYS[7], i)
  end
end
local t = redis.call('TIME')
local now = t[1] + t[2] / 1e6
-- when the job last moved: `stalled.lua` reads it for the stuck-jobs metric
redis.call('HSET', KEYS[1], 'progress_at', now)
local after = counters('recorded')
if after[2] + after[3] + after[4] >= after[5] then
  redis.call('HSETNX', KEYS[1], 'completed_at', now)
end
return after
