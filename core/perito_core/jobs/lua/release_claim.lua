-- Forget the claims a refused submission made: its request id, its output location.
-- KEYS[1]: the job's record; KEYS[2..]: the claim keys. ARGV: the job id.
-- Nothing is forgotten if the job exists (it was made after all); a claim that names another
-- job now is left alone. Returns how many claims were deleted.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local deleted = 0
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    deleted = deleted + redis.call('DEL', KEYS[i])
  end
end
return deleted
