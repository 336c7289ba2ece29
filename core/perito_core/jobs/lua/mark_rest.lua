-- Close every open chunk without a part: each of its items cancelled, or failed with the
-- job's error. KEYS: job, open, chunks (slots). ARGV: mark (65535 cancelled, 65534 failed),
-- the counter it moves ('cancelled' or 'failed'), the error (kept as `rest_error`: what every
-- item of a chunk closed failed says). Returns the number of items closed. One step per open
-- chunk, never per item.
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return 0 end
local open = redis.call('HGETALL', KEYS[2])
local marked = 0
for i = 1, #open, 2 do
  local chunk = tonumber(open[i])
  redis.call('BITFIELD', KEYS[3], 'SET', 'u16', '#' .. (2 * chunk), ARGV[1],
    'SET', 'u16', '#' .. (2 * chunk + 1), 0)
  marked = marked + tonumber(open[i + 1])
end
redis.call('DEL', KEYS[2])
if marked > 0 then
  redis.call('HINCRBY', KEYS[1], ARGV[2], marked)
  if ARGV[3] ~= '' then redis.call('HSETNX', KEYS[1], 'rest_error', ARGV[3]) end
end
local t = redis.call('TIME')
redis.call('HSETNX', KEYS[1], 'completed_at', t[1] + t[2] / 1e6)
return marked
