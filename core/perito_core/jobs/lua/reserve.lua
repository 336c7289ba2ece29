-- Reserve one of a tenant's concurrent-job slots for a job being submitted. KEYS: the
-- tenant's active jobs. ARGV: job id, limit, now, stale-before (both Unix seconds), then the
-- ids of entries older than stale-before that the caller found without a job record (a
-- submission that died): each is dropped if its entry is still that old (a job recorded since
-- has a newer one: `JobStore._index` writes it after the record).
-- Returns 1 if reserved (or already held by this job id), 0 if the tenant is at its limit.
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
for i = 5, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) < tonumber(ARGV[4]) then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
