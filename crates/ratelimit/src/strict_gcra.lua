-- GCRA decided inside Redis for agentmesh-ratelimit's STRICT consistency (see strict.rs).
--
-- KEYS[i]   the state of item i.
-- ARGV[1]   '1': all or nothing (debit every item or none), '0': one item per call.
-- ARGV[2 + 8*(i-1) ...] for item i, all non-negative integers below 2^53:
--   scale, tau_us, tau_f, need_us, need_f, debit_us, debit_f, flags
--   (flags: 1 = never fits, 2 = shadow: over its limit it does not fail an all-or-nothing batch)
--
-- Times are two-part: whole microseconds plus a fraction in 1/scale us (0 <= f < scale). The
-- client chose `scale` so that one unit's emission interval is a whole number of 1/scale us and
-- computed tau (the burst tolerance), need (what must fit: max(cost, 1) units) and debit (cost
-- units) exactly; here they are only added, subtracted and compared, so nothing rounds.
--
-- State: "tat_us:tat_f:scale" (the theoretical arrival time), with PX set to the time until the
-- bucket is full again (+1 ms), after which the key is equivalent to a fresh one.
--
-- Returns 8 integers per item: allowed, never, span (us, f) = horizon - tat after the decision
-- (the client divides it into whole units remaining), reset (us, f) = tat after - now, and
-- retry (us, f) = how long until `need` fits (0 when allowed or never).

local function add(a, af, b, bf, s)
  local f = af + bf
  if f >= s then
    return a + b + 1, f - s
  end
  return a + b, f
end

-- a - b, for a >= b.
local function sub(a, af, b, bf, s)
  local f = af - bf
  if f < 0 then
    return a - b - 1, f + s
  end
  return a - b, f
end

local function lt(a, af, b, bf)
  return a < b or (a == b and af < bf)
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local all_or_nothing = ARGV[1] == '1'

-- The batch's own tentative states by key, so the same key twice sees its own debit.
local tentative = {}
local written = {}
local failed = false
local out = {}

for i = 1, #KEYS do
  local key = KEYS[i]
  local a = 2 + (i - 1) * 8
  local s = tonumber(ARGV[a])
  local tau, tauf = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local need, needf = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local debit, debitf = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local flags = tonumber(ARGV[a + 7])
  local never = flags % 2 == 1
  local shadow = flags >= 2

  local tat, tatf, tats
  local state = tentative[key]
  if state then
    tat, tatf, tats = state[1], state[2], state[3]
  else
    local stored = redis.call('GET', key)
    if stored then
      local u, f, sc = string.match(stored, '^(%d+):(%d+):(%d+)$')
      if u then
        tat, tatf, tats = tonumber(u), tonumber(f), tonumber(sc)
      end
    end
  end

  -- base = max(min(tat, horizon), now): a TAT beyond the horizon (Redis's clock went back)
  -- reads as an empty bucket, and is stored so, rather than locking the key until then.
  local h, hf = now + tau, tauf
  local base, basef, clamped = now, 0, false
  if tat then
    if tats ~= s then
      -- Stored under another scale: round the fraction up, which never admits more.
      if tatf > 0 then
        tat = tat + 1
      end
      tatf = 0
    end
    if lt(h, hf, tat, tatf) then
      base, basef, clamped = h, hf, true
    elseif lt(now, 0, tat, tatf) then
      base, basef = tat, tatf
    end
  end

  local allowed = false
  local retry, retryf = 0, 0
  if not never then
    local e, ef = add(base, basef, need, needf, s)
    if lt(h, hf, e, ef) then
      retry, retryf = sub(e, ef, h, hf, s)
    else
      allowed = true
    end
  end

  local after, afterf = base, basef
  if allowed then
    after, afterf = add(base, basef, debit, debitf, s)
  end
  if (allowed and (debit > 0 or debitf > 0)) or clamped then
    if not tentative[key] then
      written[#written + 1] = key
    end
    tentative[key] = { after, afterf, s }
  end
  if not allowed and not shadow then
    failed = true
  end

  local span, spanf = sub(h, hf, after, afterf, s)
  local reset, resetf = sub(after, afterf, now, 0, s)
  local o = #out
  out[o + 1] = allowed and 1 or 0
  out[o + 2] = never and 1 or 0
  out[o + 3] = span
  out[o + 4] = spanf
  out[o + 5] = reset
  out[o + 6] = resetf
  out[o + 7] = retry
  out[o + 8] = retryf
end

if not (all_or_nothing and failed) then
  for _, key in ipairs(written) do
    local st = tentative[key]
    local reset, resetf = sub(st[1], st[2], now, 0, st[3])
    if resetf > 0 then
      reset = reset + 1
    end
    -- Whole milliseconds, rounded up, plus one: the key outlives the bucket's refill.
    local ms = math.floor((reset + 999) / 1000) + 1
    -- %.0f: tostring would print large numbers in exponent notation.
    local value = string.format('%.0f:%.0f:%.0f', st[1], st[2], st[3])
    redis.call('SET', key, value, 'PX', string.format('%.0f', ms))
  end
end

return out
