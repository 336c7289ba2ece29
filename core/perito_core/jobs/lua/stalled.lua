-- The longest time a job not yet terminal has gone without moving, per state. Read-only.
-- KEYS: active jobs (sorted set of job keys). Returns {queued seconds, running seconds}, as
-- strings (0 when no job is in that state): a queued job waits since it was made, a running
-- one since its last recorded result or, before its first, since it started.
local t = redis.call('TIME')
local now = t[1] + t[2] / 1e6
local worst = {queued = 0, running = 0}
for _, key in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local v = redis.call('HMGET', key, 'state', 'created_at', 'started_at', 'progress_at')
  local state = v[1]
  if state and worst[state] ~= nil then
    local since = math.max(tonumber(v[2]) or 0, tonumber(v[3]) or 0, tonumber(v[4]) or 0)
    if since > 0 then worst[state] = math.max(worst[state], now - since) end
  end
end
return {tostring(worst.queued), tostring(worst.running)}
