--- The buffers a person reads: this Neovim's calls, the dead letters, one
--- call and its journal, and the conflicts of a correction to resolve.
local api = vim.api

local M = {}

--- bufnr -> { [row] = command id } for the list buffers.
local rows = {}

local function dovecote()
  return require("dovecote")
end

local function say(message, level)
  vim.notify("dovecote: " .. message, level or vim.log.levels.INFO)
end

--- The buffer `name` (made if need be) of 'buftype' `buftype`, shown in a
--- window (a new split when not shown yet), which becomes the current one
--- unless `keep_focus`.
local function shown(name, buftype, keep_focus)
  local bufnr = vim.fn.bufnr(name)
  if bufnr == -1 then
    bufnr = api.nvim_create_buf(buftype == "acwrite", buftype ~= "acwrite")
    api.nvim_buf_set_name(bufnr, name)
  end
  vim.bo[bufnr].buftype = buftype
  vim.bo[bufnr].swapfile = false
  local win, before = vim.fn.bufwinid(bufnr), api.nvim_get_current_win()
  if win == -1 then
    vim.cmd("botright split")
    api.nvim_win_set_buf(0, bufnr)
  else
    api.nvim_set_current_win(win)
  end
  if keep_focus then
    api.nvim_set_current_win(before)
  end
  return bufnr
end

--- The scratch buffer `name`, shown.
local function scratch(name, filetype)
  local bufnr = shown(name, "nofile")
  vim.bo[bufnr].bufhidden = "hide"
  vim.bo[bufnr].filetype = filetype
  return bufnr
end

local function set_lines(bufnr, lines)
  vim.bo[bufnr].modifiable = true
  api.nvim_buf_set_lines(bufnr, 0, -1, false, lines)
  vim.bo[bufnr].modifiable = false
  vim.bo[bufnr].modified = false
end

local function map(bufnr, lhs, rhs, desc)
  vim.keymap.set("n", lhs, rhs, { buffer = bufnr, nowait = true, silent = true, desc = desc })
end

--- How long ago the epoch time `t` was, in short words.
function M.age(t)
  local s = math.max(0, os.time() - (tonumber(t) or os.time()))
  if s < 60 then
    return string.format("%ds", s)
  elseif s < 3600 then
    return string.format("%dm", math.floor(s / 60))
  elseif s < 86400 then
    return string.format("%dh", math.floor(s / 3600))
  end
  return string.format("%dd", math.floor(s / 86400))
end

--- The first line of the last message of a wire command's request.
local function prompt_line(command)
  local messages = type(command.request) == "table" and command.request.messages or {}
  local last = messages[#messages]
  local content = type(last) == "table" and type(last.content) == "string" and last.content or ""
  return (content:match("^[^\n]*"))
end

local function buffer_name(id)
  local call = dovecote().call_info(id)
  if call and api.nvim_buf_is_valid(call.bufnr) then
    local name = api.nvim_buf_get_name(call.bufnr)
    return name ~= "" and vim.fn.fnamemodify(name, ":t") or ("[" .. call.bufnr .. "]")
  end
  return "-"
end

local function row(command)
  local state = command.state .. (command.reason and ("/" .. command.reason) or "")
  return string.format("%-8s  %-22s  %4s  %-10s  %-14s  %s", command.id:sub(-8), state,
    M.age(command.createdAt), command.adapter or "", buffer_name(command.id), prompt_line(command))
end

local function id_at_cursor(bufnr)
  local map_ = rows[bufnr] or {}
  return map_[api.nvim_win_get_cursor(0)[1]]
end

local function show_at_cursor(bufnr)
  local id = id_at_cursor(bufnr)
  if id then
    M.show(id)
  end
end

local function render(bufnr, header, commands)
  local lines = {
    header,
    string.format("%-8s  %-22s  %4s  %-10s  %-14s  %s", "id", "state", "age", "adapter", "buffer", "prompt"),
  }
  local ids = {}
  for _, command in ipairs(commands) do
    lines[#lines + 1] = row(command)
    ids[#lines] = command.id
  end
  if #commands == 0 then
    lines[#lines + 1] = "(none)"
  end
  rows[bufnr] = ids
  set_lines(bufnr, lines)
end

--- :DovecoteList: this Neovim's calls, newest first.
function M.list()
  local commands = {}
  local ids = dovecote().calls()
  for i = #ids, 1, -1 do
    local result = dovecote().request_sync("command/show", { commandId = ids[i] })
    if type(result) == "table" and type(result.command) == "table" then
      commands[#commands + 1] = result.command
    end
  end
  local bufnr = scratch("dovecote://calls", "dovecote")
  render(bufnr, "Calls of this Neovim.  <CR> shows one, x cancels, r replays a dead one, c opens its conflicts, "
    .. "R refreshes, q closes",
    commands)
  map(bufnr, "<CR>", function()
    show_at_cursor(bufnr)
  end, "show the call and its journal")
  map(bufnr, "x", function()
    local id = id_at_cursor(bufnr)
    if id then
      dovecote().cancel_call(id)
      vim.defer_fn(M.list, 200)
    end
  end, "cancel the call")
  map(bufnr, "r", function()
    local id = id_at_cursor(bufnr)
    if id then
      dovecote().replay({ id }, vim.v.count > 0 and vim.v.count or nil)
      M.list()
    end
  end, "replay the dead call (a count: its timeout in seconds)")
  map(bufnr, "c", function()
    local id = id_at_cursor(bufnr)
    local result = id and dovecote().request_sync("command/show", { commandId = id })
    if type(result) == "table" and (tonumber(result.unresolved) or 0) > 0 then
      M.conflicts(id, result, dovecote().call_info(id) and dovecote().call_info(id).bufnr, true)
    elseif id then
      say("call " .. id:sub(-8) .. " has no conflict to resolve")
    end
  end, "open the call's conflicts to resolve")
  map(bufnr, "R", M.list, "refresh")
  map(bufnr, "q", "<cmd>close<CR>", "close")
  return bufnr
end

--- :DovecoteDead: the dead letters (calls that timed out or failed).
function M.dead()
  local result, err = dovecote().request_sync("deadletter/list", nil)
  if not result then
    say("cannot list the dead letters: " .. tostring(err), vim.log.levels.ERROR)
    return nil
  end
  local bufnr = scratch("dovecote://dead", "dovecote")
  local commands = result.commands or {}
  render(bufnr, "Dead letters.  r replays one, R replays all (a count: the timeout in seconds), "
    .. "<CR> shows one, q closes", commands)
  local function replay(ids)
    if #ids > 0 then
      local new = dovecote().replay(ids, vim.v.count > 0 and vim.v.count or nil)
      say(string.format("replayed %d call%s", #new, #new == 1 and "" or "s"))
      M.dead()
    end
  end
  map(bufnr, "r", function()
    replay({ id_at_cursor(bufnr) })
  end, "replay this dead letter")
  map(bufnr, "R", function()
    replay(vim.tbl_values(rows[bufnr] or {}))
  end, "replay every dead letter listed")
  map(bufnr, "<CR>", function()
    show_at_cursor(bufnr)
  end, "show the call and its journal")
  map(bufnr, "q", "<cmd>close<CR>", "close")
  return bufnr
end

local function json(value)
  if value == nil or value == vim.NIL then
    return "null"
  end
  local ok, text = pcall(vim.json.encode, value)
  return ok and text or tostring(value)
end

--- One call: its record and its journal (`command/show`).
function M.show(id)
  local result, err = dovecote().request_sync("command/show", { commandId = id })
  if not result then
    say("cannot show " .. id .. ": " .. tostring(err), vim.log.levels.ERROR)
    return nil
  end
  local c = result.command or {}
  local lines = {
    "Call " .. tostring(c.id),
    string.format("state     %s%s", tostring(c.state), c.reason and (" (" .. c.reason .. ")") or ""),
    "adapter   " .. tostring(c.adapter),
    string.format("attempt   %s of %s", tostring(c.attempt), tostring(c.maxAttempts)),
    "timeout   " .. json(c.timeout),
    "created   " .. (c.createdAt and os.date("%Y-%m-%d %H:%M:%S", math.floor(c.createdAt)) or "?"),
    "flow      " .. json(c.flowId),
    "replay of " .. json(c.replayOf),
    "",
    "Request:",
  }
  for _, message in ipairs(type(c.request) == "table" and c.request.messages or {}) do
    for i, line in ipairs(vim.split(tostring(message.content), "\n", { plain = true })) do
      lines[#lines + 1] = (i == 1 and ("  " .. tostring(message.role) .. ": ") or "    ") .. line
    end
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "Reply:"
  local reply = type(c.reply) == "table" and c.reply.text or nil
  for _, line in ipairs(vim.split(reply and tostring(reply) or "(none)", "\n", { plain = true })) do
    lines[#lines + 1] = "  " .. line
  end
  if c.error and c.error ~= vim.NIL then
    lines[#lines + 1] = "Error: " .. json(c.error)
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "Journal:"
  for _, e in ipairs(result.events or {}) do
    lines[#lines + 1] = string.format("  %s  %-8s -> %-9s %-8s %s",
      e.at and os.date("%H:%M:%S", math.floor(e.at)) or "?", tostring(e.from ~= vim.NIL and e.from or "-"),
      tostring(e.to), tostring(e.event or ""), e.detail ~= nil and e.detail ~= vim.NIL and json(e.detail) or "")
  end
  local bufnr = scratch("dovecote://call/" .. id, "dovecote")
  set_lines(bufnr, lines)
  map(bufnr, "q", "<cmd>close<CR>", "close")
  return bufnr
end

-- Conflicts -------------------------------------------------------------------

--- command id -> { conflicts, bufnr of the conflict buffer }
local open_conflicts = {}

local HEADER = "^── conflict (%d+) of %d+ ──$"

local function side(lines, text)
  if text ~= "" then
    vim.list_extend(lines, vim.split(text, "\n", { plain = true }))
  end
end

--- The blocks of conflict buffer `bufnr`: index -> text as it is now.
local function blocks(bufnr)
  local found, current, text = {}, nil, nil
  for _, line in ipairs(api.nvim_buf_get_lines(bufnr, 0, -1, false)) do
    local n = line:match(HEADER)
    if n then
      if current then
        found[current] = text
      end
      current, text = tonumber(n), {}
    elseif current then
      text[#text + 1] = line
    end
  end
  if current then
    found[current] = text
  end
  for n, lines in pairs(found) do
    if lines[#lines] == "" then
      lines[#lines] = nil -- the blank line between blocks
    end
    found[n] = table.concat(lines, "\n")
  end
  return found
end

local function finish(id, bufnr)
  local state = open_conflicts[id]
  local found = blocks(bufnr)
  local choices = {}
  for n = #state.conflicts, 1, -1 do
    local conflict = state.conflicts[n]
    local text = found[n]
    if conflict.done then
      goto continue
    end
    if text == nil then
      say("conflict " .. n .. " is gone from the buffer; write it again", vim.log.levels.ERROR)
      return
    end
    if text:find("^<<<<<<< ") or text:find("\n<<<<<<< ") or text:find("\n>>>>>>> ")
      or text:find("\n||||||| ") or text:find("\n=======") then
      say("conflict " .. n .. " is not resolved yet", vim.log.levels.WARN)
      return
    end
    local choice = { n = n, index = conflict.index }
    if text == conflict.ours then
      choice.choice = "ours"
    elseif text == conflict.theirs then
      choice.choice = "theirs"
    else
      choice.choice, choice.text = "text", text
    end
    choices[#choices + 1] = choice
    ::continue::
  end
  -- One by one, last first, each sent only once: a write after a failure
  -- sends those left.
  local function next_choice(k)
    local c = choices[k]
    if not c then
      open_conflicts[id] = nil
      if api.nvim_buf_is_valid(bufnr) then
        vim.bo[bufnr].modified = false
        pcall(api.nvim_buf_delete, bufnr, { force = true })
      end
      say("conflicts of " .. id:sub(-8) .. " resolved")
      return
    end
    dovecote().request("conflict/resolve", { commandId = id, index = c.index, choice = c.choice, text = c.text },
      function(err, result)
        result = type(result) == "table" and result or {}
        if err then
          say("conflict/resolve failed: " .. (err.message or "?"), vim.log.levels.ERROR)
          return
        end
        if vim.tbl_contains(result.changed or {}, c.index) then
          -- The person changed that text again since: their text stays.
          say(string.format("conflict %d: you changed that text since; yours stays", c.n))
        elseif result.applied ~= true then
          say(string.format("conflict %d could not be applied; write again", c.n), vim.log.levels.WARN)
          return
        end
        state.conflicts[c.n].done = true
        next_choice(k + 1)
      end)
  end
  next_choice(1)
end

--- Keep one side of the block under the cursor: "ours" or "theirs".
local function keep(bufnr, which)
  local cursor = api.nvim_win_get_cursor(0)[1]
  local lines = api.nvim_buf_get_lines(bufnr, 0, -1, false)
  local first, last
  for i = cursor, 1, -1 do
    if lines[i]:find("^<<<<<<< ") then
      first = i
      break
    end
  end
  for i = cursor, #lines do
    if lines[i]:find("^>>>>>>> ") then
      last = i
      break
    end
  end
  if not first or not last or first > cursor then
    say("no conflict block under the cursor", vim.log.levels.WARN)
    return
  end
  local kept, part = {}, "ours"
  for i = first + 1, last - 1 do
    local line = lines[i]
    if line:find("^||||||| ") then
      part = "base"
    elseif line:find("^=======$") then
      part = "theirs"
    elseif part == which then
      kept[#kept + 1] = line
    end
  end
  api.nvim_buf_set_lines(bufnr, first - 1, last, false, kept)
end

--- Open the kept conflicts of call `id` (its `command/show` result) about
--- buffer `source` for a person to resolve, its window current with
--- `focus`; `:w` sends the resolution.
function M.conflicts(id, result, source, focus)
  -- Those still kept, with the person's text as it is now when the server
  -- says (`kept`); else all of them, numbered as the server numbers them.
  local conflicts = {}
  if type(result.kept) == "table" then
    conflicts = vim.deepcopy(result.kept)
  else
    for i, c in ipairs(result.conflicts or {}) do
      conflicts[i] = vim.tbl_extend("force", c, { index = i - 1 })
    end
  end
  open_conflicts[id] = { conflicts = conflicts }
  local name = "dovecote://conflict/" .. id
  -- It opens when a reply lands, maybe while the person types elsewhere:
  -- shown, but the cursor stays where it is (unless asked for).
  local bufnr = shown(name, "acwrite", not focus)
  local where = source and api.nvim_buf_is_valid(source) and api.nvim_buf_get_name(source) or ""
  local lines = {
    "Conflicts of the correction " .. id:sub(-8) .. (where ~= "" and (" of " .. vim.fn.fnamemodify(where, ":t")) or "")
      .. ": your text now (yours), as it was (original), the model's (model).",
    "Keep a side with co (yours) or ct (model), or edit the block into the text you want; :w sends them.",
    "",
  }
  for i, c in ipairs(conflicts) do
    lines[#lines + 1] = string.format("── conflict %d of %d ──", i, #conflicts)
    lines[#lines + 1] = "<<<<<<< yours"
    side(lines, c.ours or "")
    lines[#lines + 1] = "||||||| original"
    side(lines, c.base or "")
    lines[#lines + 1] = "======="
    side(lines, c.theirs or "")
    lines[#lines + 1] = ">>>>>>> model"
    lines[#lines + 1] = ""
  end
  api.nvim_buf_set_lines(bufnr, 0, -1, false, lines)
  vim.bo[bufnr].modified = false
  api.nvim_create_autocmd("BufWriteCmd", {
    group = api.nvim_create_augroup("dovecote_conflict_" .. bufnr, { clear = true }),
    buffer = bufnr,
    callback = function()
      finish(id, bufnr)
    end,
  })
  map(bufnr, "co", function()
    keep(bufnr, "ours")
  end, "keep your side of the conflict")
  map(bufnr, "ct", function()
    keep(bufnr, "theirs")
  end, "keep the model's side of the conflict")
  say(string.format("%d conflict%s to resolve in %s", #conflicts, #conflicts == 1 and "" or "s", name))
  return bufnr
end

--- The conflict buffers open now: command id -> bufnr.
function M.conflict_buffers()
  local out = {}
  for id in pairs(open_conflicts) do
    local b = vim.fn.bufnr("dovecote://conflict/" .. id)
    if b ~= -1 then
      out[id] = b
    end
  end
  return out
end

return M
