-- The chunks of a job that are open (items unrecorded) and not leased by a live worker.
-- KEYS: open, leases. Returns a flat list of chunk numbers.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local found = {}
for _, chunk in ipairs(redis.call('HKEYS', KEYS[1])) do
  local lease = redis.call('HGET', KEYS[2], chunk)
  local live = false
  if lease then
    local expiry = string.match(lease, ' (%d+)$')
    live = tonumber(expiry) > now
  end
  if not live then table.insert(found, chunk) end
end
return found
