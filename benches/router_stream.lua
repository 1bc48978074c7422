-- wrk -s router_stream.lua http://HOST:PORT/v1/completions : streamed completion of 1000 tokens (SSE)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"mock","prompt":"the quick brown fox","max_tokens":1000,"ignore_eos":true,"stream":true}'
