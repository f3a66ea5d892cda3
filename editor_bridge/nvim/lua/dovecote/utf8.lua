--- Code points of Neovim's byte strings, as the protocol counts them.
---
--- Neovim counts bytes; the protocol counts Unicode code points (not UTF-16
--- units).  A buffer may also hold bytes that are not UTF-8 (a file read
--- with the wrong 'fileencoding'): each such byte counts as one code point
--- and is sent as U+FFFD, so the server's text and our offsets always agree
--- and the server never receives invalid Unicode.
local M = {}

local byte = string.byte

--- The length in bytes of the valid UTF-8 sequence at byte `i` of `s`, or
--- nil when the byte there does not start one (overlong forms, surrogates
--- and values past U+10FFFF are invalid too).
local function sequence(s, i)
  local c = byte(s, i)
  if c < 0x80 then
    return 1
  end
  local n, low, high
  if c >= 0xC2 and c <= 0xDF then
    n = 2
  elseif c >= 0xE0 and c <= 0xEF then
    n = 3
    low = (c == 0xE0) and 0xA0 or 0x80
    high = (c == 0xED) and 0x9F or 0xBF
  elseif c >= 0xF0 and c <= 0xF4 then
    n = 4
    low = (c == 0xF0) and 0x90 or 0x80
    high = (c == 0xF4) and 0x8F or 0xBF
  else
    return nil
  end
  local second = byte(s, i + 1)
  if not second or second < (low or 0x80) or second > (high or 0xBF) then
    return nil
  end
  for k = i + 2, i + n - 1 do
    local b = byte(s, k)
    if not b or b < 0x80 or b > 0xBF then
      return nil
    end
  end
  return n
end

local function ascii(s)
  return not s:find("[\128-\255]")
end

--- The number of code points in `s`.
function M.count(s)
  if ascii(s) then
    return #s
  end
  local i, n, len = 1, 0, #s
  while i <= len do
    i = i + (sequence(s, i) or 1)
    n = n + 1
  end
  return n
end

--- The byte offset (0-based) of code point `cp` (0-based) of `s`; a `cp`
--- past the end gives #s.
function M.byte_offset(s, cp)
  if ascii(s) then
    return math.min(cp, #s)
  end
  local i, n, len = 1, 0, #s
  while i <= len and n < cp do
    i = i + (sequence(s, i) or 1)
    n = n + 1
  end
  return i - 1
end

--- `s` with every byte that is not part of valid UTF-8 replaced by U+FFFD.
function M.clean(s)
  if ascii(s) then
    return s
  end
  local parts, i, len, from = {}, 1, #s, 1
  while i <= len do
    local n = sequence(s, i)
    if n then
      i = i + n
    else
      parts[#parts + 1] = s:sub(from, i - 1)
      parts[#parts + 1] = "\239\191\189"
      i = i + 1
      from = i
    end
  end
  if from == 1 then
    return s
  end
  parts[#parts + 1] = s:sub(from)
  return table.concat(parts)
end

return M
