-- The load benchmark's requests for wrk (cli/benches/load.rs runs it): every
-- request is one of the example events (LOAD_EVENTS, colon-separated files)
-- with its event and order ids made unique, signed with HMAC-SHA256 of the
-- body under LOAD_SECRET by the libcrypto wrk itself links (through LuaJIT's
-- FFI), so signing costs the generator microseconds, the same for every
-- endpoint it loads. `done` prints one line the benchmark parses.
local ffi = require("ffi")
ffi.cdef[[
typedef struct evp_md_st EVP_MD;
const EVP_MD *EVP_sha256(void);
unsigned char *HMAC(const EVP_MD *md, const void *key, int key_len,
                    const unsigned char *d, size_t n, unsigned char *out,
                    unsigned int *out_len);
]]
local ok, crypto = pcall(function() ffi.C.EVP_sha256(); return ffi.C end)
if not ok then crypto = ffi.load("libcrypto.so.3") end

local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

local secret = os.getenv("LOAD_SECRET")
local path = os.getenv("LOAD_PATH") or "/webhooks/stateset"
local run = os.getenv("LOAD_RUN") or tostring(os.time())
local templates = {}
local hex = {}
for i = 0, 255 do hex[i] = string.format("%02x", i) end
local mac = ffi.new("unsigned char[32]")
local mac_len = ffi.new("unsigned int[1]")
local sha256
local counter = 0

function init(args)
  sha256 = crypto.EVP_sha256()
  for file in string.gmatch(os.getenv("LOAD_EVENTS"), "[^:]+") do
    local f = assert(io.open(file, "rb"))
    local text = f:read("*a")
    f:close()
    -- Split after every event and order id: each request appends its own
    -- suffix there, so every event, and every order, is new.
    local pieces, from = {}, 1
    for stop in string.gmatch(text, '"[eo][vr][td]_[%w]+()"') do
      pieces[#pieces + 1] = string.sub(text, from, stop - 1)
      from = stop
    end
    pieces[#pieces + 1] = string.sub(text, from)
    templates[#templates + 1] = pieces
  end
end

function request()
  counter = counter + 1
  local t = templates[counter % #templates + 1]
  local suffix = "_" .. run .. "_" .. tid .. "_" .. counter
  local body = table.concat(t, suffix)
  crypto.HMAC(sha256, secret, #secret, body, #body, mac, mac_len)
  local out = {}
  for i = 0, 31 do out[i + 1] = hex[mac[i]] end
  return wrk.format("POST", path, {
    ["Content-Type"] = "application/json",
    ["X-StateSet-Signature"] = table.concat(out),
  }, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("wrk-result requests=%d duration_us=%d non_2xx=%d socket_errors=%d p50_us=%d p99_us=%d p999_us=%d\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
