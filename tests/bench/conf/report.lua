-- wrk script: prints one machine-readable RESULT line. Headers come from wrk -H.
-- Optional pacing: WRK_THINK_MS > 0 gives every connection an exponentially distributed think time
-- (that mean, in ms) before each request, so about conns * 1000 / WRK_THINK_MS requests/s arrive spread out.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"rps":%.1f,"bytes":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"lat_mean_us":%.1f,"lat_max_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6), summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end

local think_ms = tonumber(os.getenv("WRK_THINK_MS") or "0") or 0
if think_ms > 0 then
  math.randomseed(os.time())
  function delay()
    return math.floor(-math.log(1 - math.random()) * think_ms + 0.5)
  end
end
