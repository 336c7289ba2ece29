-- Take the lease on a chunk. KEYS: job, open, leases, attempts. ARGV: chunk, holder, ttl_ms.
-- Returns {outcome, attempts}: outcome is 'acquired', 'busy' (another live holder), 'done'
-- (every item recorded), 'terminal' or 'gone'.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'gone', 0} end
if state ~= 'queued' and state ~= 'running' then return {'terminal', 0} end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return {'done', 0} end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local lease = redis.call('HGET', KEYS[3], ARGV[1])
if lease then
  local holder, expiry = string.match(lease, '^(.*) (%d+)$')
  if holder ~= ARGV[2] and tonumber(expiry) > now then return {'busy', 0} end
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ' ' .. (now + tonumber(ARGV[3])))
return {'acquired', redis.call('HINCRBY', KEYS[4], ARGV[1], 1)}
