-- Reserve one of a tenant's concurrent-job slots for a job being submitted. KEYS: the
-- tenant's active jobs. ARGV: job id, limit, now, stale-before (both seconds), job key prefix.
-- Entries for jobs that never got a record (a submission that died) are dropped once stale.
-- Returns 1 if reserved (or already held by this job id), 0 if the tenant is at its limit.
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local count = 0
for i = 1, #members, 2 do
  local id, score = members[i], tonumber(members[i + 1])
  if score < tonumber(ARGV[4]) and redis.call('EXISTS', ARGV[5] .. id) == 0 then
    redis.call('ZREM', KEYS[1], id)
  else
    count = count + 1
  end
end
if count >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
