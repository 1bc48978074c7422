-- wrk -s chat.lua http://HOST:PORT/v1/chat/completions : non-streaming chat, 11 prompt tokens, 16 output tokens
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"mock","messages":[{"role":"user","content":"the quick brown fox jumps over the lazy dog"}],"max_tokens":16}'
