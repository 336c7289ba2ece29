-- Forget a claim a refused submission made (its request id's, its output location's) if it
-- still names the job. KEYS: the claim. ARGV: the job id. Returns 1 if deleted, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
