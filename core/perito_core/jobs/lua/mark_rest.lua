-- Mark every item without a result with ARGV[1] (a result json) and state ARGV[2], for
-- indices 0 .. total-1. KEYS: job, results, open. Returns the number marked.
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return 0 end
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
local marked = 0
for i = 0, total - 1 do
  if redis.call('HSETNX', KEYS[2], i, ARGV[1]) == 1 then
    marked = marked + 1
    redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
  end
end
redis.call('DEL', KEYS[3])
local t = redis.call('TIME')
redis.call('HSETNX', KEYS[1], 'completed_at', t[1] + t[2] / 1e6)
return marked
