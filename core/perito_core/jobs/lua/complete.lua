-- Close a chunk: record which part counts and its tallies (or, with no part, that every item
-- failed and why), move the job's counters, drop what only a running chunk needs.
-- KEYS: job, open, leases, attempts, chunk-errors, chunks (slots), inline, chunk-failures.
-- ARGV: chunk, holder, attempt (65534: closed failed without a part), succeeded, failed,
-- index of its first item, its items, the reason its items failed (without a part only).
-- Returns {outcome, succeeded, failed, cancelled, total} (the job's counters after):
-- 'recorded'; 'lost' (the lease is not the holder's: it lapsed and another worker took the
-- chunk, or Redis lost it; the part is never referred to); 'done' (the chunk was closed
-- already: recorded, cancelled or failed); 'mismatch' (succeeded + failed is not the number
-- of items the chunk was made with: nothing changed); 'terminal' or 'gone' (the job ended,
-- or is gone).
local function counters(outcome)
  local v = redis.call('HMGET', KEYS[1], 'succeeded', 'failed', 'cancelled', 'total')
  return {outcome, tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0,
    tonumber(v[4]) or 0}
end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'gone', 0, 0, 0, 0} end
if state ~= 'queued' and state ~= 'running' then return counters('terminal') end
local items = redis.call('HGET', KEYS[2], ARGV[1])
if not items then return counters('done') end
local lease = redis.call('HGET', KEYS[3], ARGV[1])
if not lease or string.match(lease, '^(.*) %d+$') ~= ARGV[2] then return counters('lost') end
if tonumber(ARGV[4]) + tonumber(ARGV[5]) ~= tonumber(items) then return counters('mismatch') end
local chunk = tonumber(ARGV[1])
redis.call('BITFIELD', KEYS[6], 'SET', 'u16', '#' .. (2 * chunk), ARGV[3],
  'SET', 'u16', '#' .. (2 * chunk + 1), ARGV[5])
if ARGV[3] == '65534' then redis.call('HSET', KEYS[8], ARGV[1], ARGV[8]) end
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
-- when the job last moved: `JobStore.stalled_seconds` reads it for the stuck-jobs metric
redis.call('HSET', KEYS[1], 'progress_at', now)
local after = counters('recorded')
if after[2] + after[3] + after[4] >= after[5] then
  redis.call('HSETNX', KEYS[1], 'completed_at', now)
end
return after
