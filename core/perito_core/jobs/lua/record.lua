-- Record results. KEYS: job, results, open. ARGV: triples of (index, result json, state).
-- Returns {newly recorded, succeeded, failed, cancelled, total}; {-1, ...} for a job that is
-- gone or terminal.
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return {-1, 0, 0, 0, 0} end
local size = tonumber(redis.call('HGET', KEYS[1], 'chunk_size'))
local new = 0
for i = 1, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    new = new + 1
    redis.call('HINCRBY', KEYS[1], ARGV[i + 2], 1)
    local chunk = math.floor(tonumber(ARGV[i]) / size)
    if redis.call('HINCRBY', KEYS[3], chunk, -1) <= 0 then redis.call('HDEL', KEYS[3], chunk) end
  end
end
local v = redis.call('HMGET', KEYS[1], 'succeeded', 'failed', 'cancelled', 'total')
if new > 0 then
  local t = redis.call('TIME')
  -- when the job last moved: `stalled.lua` reads it for the stuck-jobs metric
  redis.call('HSET', KEYS[1], 'progress_at', t[1] + t[2] / 1e6)
  if tonumber(v[1]) + tonumber(v[2]) + tonumber(v[3]) >= tonumber(v[4]) then
    redis.call('HSETNX', KEYS[1], 'completed_at', t[1] + t[2] / 1e6)
  end
end
return {new, tonumber(v[1]), tonumber(v[2]), tonumber(v[3]), tonumber(v[4])}
