-- Take the watchdog's sweep lock for ARGV[1], or renew it if ARGV[1] holds it already.
-- KEYS: the lock. ARGV: holder, ttl_ms. Returns 1 if ARGV[1] holds it now, else 0.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
