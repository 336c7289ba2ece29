-- Renew (ARGV[3] > 0) or release (ARGV[3] == 0) a lease held by ARGV[2]. KEYS: leases.
-- ARGV: chunk, holder, ttl_ms. Returns 1 if the caller held it, 0 if it had been lost.
local lease = redis.call('HGET', KEYS[1], ARGV[1])
if not lease then return 0 end
local holder = string.match(lease, '^(.*) %d+$')
if holder ~= ARGV[2] then return 0 end
if tonumber(ARGV[3]) == 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  redis.call('HSET', KEYS[1], ARGV[1], holder .. ' ' .. (now + tonumber(ARGV[3])))
end
return 1
