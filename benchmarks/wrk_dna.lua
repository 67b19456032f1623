-- wrk script for the serving throughput benchmark: POST /dna/create-style JSON bodies (the same
-- four texts as serving_harness.TEXTS, in turn) and, at the end, one JSON line with the figures.
local bodies = {
  '{"user_text": "a fresh citrus scent for summer, not too sweet", "mode": "fast"}',
  '{"user_text": "warm amber and vanilla for winter evenings", "mode": "fast"}',
  '{"user_text": "a green floral for spring", "mode": "fast"}',
  '{"user_text": "woody and spicy, no vanilla", "mode": "fast"}',
}
local headers = { ["Content-Type"] = "application/json" }
local n = 0

request = function()
  n = n + 1
  return wrk.format("POST", nil, headers, bodies[(n % #bodies) + 1])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"socket_errors": %d, "non_2xx": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect + e.read + e.write + e.timeout, e.status))
end
