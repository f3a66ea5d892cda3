--- One buffer as the server's document: the text it sees, and offsets into it.
---
--- The server's text is every buffer line followed by "\n", whatever the
--- 'fileformat' (a "dos" buffer's lines hold no "\r": the line ends are
--- written out later, when the file is saved) and whether or not the file
--- ends with a newline.  That is also how `on_bytes` counts: each line and
--- its newline, so the byte ranges Neovim reports map onto this text.
---
--- Neovim reports changes in bytes and the protocol counts code points, and
--- the deleted text is gone by the time `on_bytes` runs: so we keep a shadow
--- of the lines and of each line's code point count, updated change by
--- change.  Anything that does not add up (a change that cuts a character in
--- two, a buffer reloaded) makes `on_bytes` answer nil, and the caller sends
--- the whole text again (`document/open`, which the server re-bases its
--- regions through).
local utf8 = require("dovecote.utf8")

local api = vim.api

local Document = {}
Document.__index = Document

local M = {}

--- A shadow of buffer `bufnr`, as its text is now.
function M.new(bufnr)
  local doc = setmetatable({ bufnr = bufnr, version = 0, lines = {}, cps = {} }, Document)
  doc:reload()
  return doc
end

--- Read the whole buffer again.
function Document:reload()
  self.lines = api.nvim_buf_get_lines(self.bufnr, 0, -1, false)
  self.cps = {}
  for i, line in ipairs(self.lines) do
    self.cps[i] = utf8.count(line)
  end
end

--- The whole text, as the server sees it.
function Document:text()
  local parts = {}
  for i, line in ipairs(self.lines) do
    parts[i] = utf8.clean(line)
  end
  parts[#parts + 1] = ""
  return table.concat(parts, "\n")
end

--- Its length in code points.
function Document:length()
  local n = #self.lines
  for i = 1, #self.cps do
    n = n + self.cps[i]
  end
  return n
end

--- The code point offset of byte `col` of row `row` (both 0-based); the row
--- just past the last line is where the final newline ends.  Nil when the
--- position is not in the shadow.
function Document:offset(row, col)
  local lines = self.lines
  if row > #lines or (row == #lines and col ~= 0) then
    return nil
  end
  local n = row
  for i = 1, row do
    n = n + self.cps[i]
  end
  local line = lines[row + 1]
  if line then
    if col > #line + 1 then
      return nil
    elseif col == #line + 1 then
      return n + self.cps[row + 1] + 1 -- just past its newline
    end
    n = n + utf8.count(line:sub(1, col))
  end
  return n
end

--- The (row, byte col) of code point offset `cp`, both 0-based: (#lines, 0)
--- is the end of the text, after the final newline.  Nil past the end.
function Document:position(cp)
  local lines, cps = self.lines, self.cps
  local n = cp
  for row = 1, #lines do
    if n <= cps[row] then
      return row - 1, utf8.byte_offset(lines[row], n)
    end
    n = n - cps[row] - 1
  end
  if n == 0 then
    return #lines, 0
  end
  return nil
end

--- Take in the change `on_bytes` reports (its arguments after the buffer
--- and changedtick) and return it as the protocol's {start, end, text}, or
--- nil when it does not add up (then send the whole text).
function Document:on_bytes(sr, sc, _, oer, oec, _, ner, nec, new_bytes)
  local lines, cps = self.lines, self.cps
  local n = #lines
  local old_row = sr + oer
  local start = self:offset(sr, sc)
  local old_end = self:offset(old_row, oer == 0 and sc + oec or oec)
  if not start or not old_end or old_end < start then
    return nil
  end
  local new_row = sr + ner
  local new_col = ner == 0 and sc + nec or nec
  local count = api.nvim_buf_line_count(self.bufnr)
  local fresh = api.nvim_buf_get_lines(self.bufnr, sr, math.min(new_row + 1, count), false)
  local pieces = {}
  for r = sr, new_row do
    local line = fresh[r - sr + 1] or ""
    pieces[#pieces + 1] = line:sub((r == sr and sc or 0) + 1, r == new_row and new_col or #line)
  end
  local text = table.concat(pieces, "\n")
  if #text ~= new_bytes then
    return nil
  end
  -- Replace the shadow's rows sr..old_row (those that exist) by the
  -- buffer's rows sr..new_row (those that exist).
  local removed = math.min(old_row + 1, n) - sr
  local added = #fresh
  if n - removed + added ~= count then
    return nil
  end
  local before = 0
  for i = sr + 1, sr + removed do
    before = before + cps[i]
  end
  if added ~= removed then
    local new_lines, new_cps = {}, {}
    for i = 1, sr do
      new_lines[i], new_cps[i] = lines[i], cps[i]
    end
    for i = sr + removed + 1, n do
      new_lines[i - removed + added], new_cps[i - removed + added] = lines[i], cps[i]
    end
    lines, cps = new_lines, new_cps
    self.lines, self.cps = lines, cps
  end
  local after = 0
  for i, line in ipairs(fresh) do
    lines[sr + i] = line
    cps[sr + i] = utf8.count(line)
    after = after + cps[sr + i]
  end
  local inserted = utf8.count(text)
  -- The code points the rows gained must be those inserted less those
  -- deleted (newlines counted as rows): else a character was cut in two.
  if (after + added) - (before + removed) ~= inserted - (old_end - start) then
    return nil
  end
  return { start = start, ["end"] = old_end, text = utf8.clean(text) }
end

--- Replace code points [start, end) with `text` in the buffer (the shadow
--- follows through `on_bytes`).  False when the range is not in the text.
function Document:replace(start, finish, text)
  local total = self:length()
  if start > finish or finish > total then
    return false
  end
  -- The last line's newline cannot be deleted in Neovim: an edit reaching
  -- past it is made before it (dropping a final "\n" of its text, which
  -- that newline stands for).
  if finish == total then
    finish = total - 1
    if start == total then
      start, text = total - 1, "\n" .. text
    end
    if text:sub(-1) == "\n" then
      text = text:sub(1, -2)
    end
  end
  local sr, sc = self:position(start)
  local er, ec = self:position(finish)
  if not sr or not er then
    return false
  end
  api.nvim_buf_set_text(self.bufnr, sr, sc, er, ec, vim.split(text, "\n", { plain = true }))
  return true
end

return M
