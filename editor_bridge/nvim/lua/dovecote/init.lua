--- dovecote.nvim: asynchronous LLM corrections, merged as you type.
---
--- `:DovecoteCorrect` starts the server's "corrections" flow on a region and
--- returns at once; you keep typing before, inside or after it, and when the
--- reply lands the server merges it three ways (the region as it was, as it
--- is now, the reply) and asks us to apply the difference, at the document
--- version it computed against (`document/applyEdit`).  Calls are durable on
--- the server: a server that dies is started again and the calls still
--- pending are picked up (`flow/watch`, `command/watch`).
---
--- State lives here: which buffers are documents, and which corrections
--- (flows) and calls (their step commands) are this Neovim's.
local connection = require("dovecote.connection")
local document = require("dovecote.document")

local api = vim.api

local M = {}

local defaults = {
  server_cmd = { "dovecote", "serve", "--stdio" },
  cwd = nil, -- the directory the server runs in (its default database is found from there)
  adapter = "scripted",
  timeout = nil, -- seconds; nil: the adapter's own
  replay_timeout = nil, -- seconds; nil: `timeout`, else the dead call's own
  on_conflict = "ask", -- "ask" | "drop" | "markers" | "theirs"
  instruction = "Correct the spelling and grammar of the text. Change nothing else: "
    .. "keep its wording, line breaks and formatting. Reply with the corrected text only.",
  reconnect_delay = 0.2, -- seconds before restarting a server that died; doubles up to 60
}

M.config = vim.deepcopy(defaults)

local ns = api.nvim_create_namespace("dovecote")
local cursor_ns = api.nvim_create_namespace("dovecote_cursors")
M.namespace = ns

--- bufnr -> Document, with .uri and .opened (the connection generation
--- the document was opened on).
local docs = {}
--- flow id -> { bufnr, mark, state, command, command_state, progress }:
--- this Neovim's corrections not yet over.
local flows = {}
--- command id -> { flow, bufnr }: this Neovim's calls, for :DovecoteList.
local calls = {}
local call_order = {}
--- flow/start requests not answered yet, and the notifications about
--- flows that overtook their answer (flow id -> list of {method, params}).
local expected = 0
local early = {}
--- The corrections whose flow/start is not answered yet: info -> true.
local asking = {}

local stopping = false
local initialized = false -- the running server answered initialize
local reconnect_timer = nil
local reconnect_wait = nil
local start_failure_shown = false

M._state = { docs = docs, flows = flows, calls = calls }

local TERMINAL = { done = true, dead = true, cancelled = true }
local FLOW_TERMINAL = { completed = true, failed = true, cancelled = true }

local function say(message, level)
  vim.notify("dovecote: " .. message, level or vim.log.levels.INFO)
end

local function clear_mark(info)
  if info.mark and api.nvim_buf_is_valid(info.bufnr) then
    pcall(api.nvim_buf_del_extmark, info.bufnr, ns, info.mark)
  end
  info.mark = nil
end

-- Connection ----------------------------------------------------------------

local handlers = {}
local ensure

local function schedule_reconnect()
  if stopping or reconnect_timer or connection.live() then
    return
  end
  if next(docs) == nil and next(flows) == nil then
    return
  end
  local wait = reconnect_wait or M.config.reconnect_delay
  reconnect_timer = vim.defer_fn(function()
    reconnect_timer = nil
    if not connection.live() and not stopping then
      local ok, why = ensure()
      if not ok then
        reconnect_wait = math.min(60, 2 * wait)
        if not start_failure_shown then
          start_failure_shown = true
          say("cannot restart the server (" .. why .. "); retrying", vim.log.levels.WARN)
        end
        schedule_reconnect()
      end
    end
  end, math.floor(wait * 1000))
end

local function open(doc)
  doc.opened = nil
  local text = doc:text()
  if connection.notify("document/open", { uri = doc.uri, version = doc.version, text = text }) then
    doc.opened = connection.generation()
  end
end

local function sync_flow(id, result)
  local info = flows[id]
  if not info or type(result) ~= "table" then
    return
  end
  local step
  for _, s in ipairs(result.steps or {}) do
    if type(s) == "table" and s.commandId then
      step = s
    end
  end
  if step and type(step.state) == "string" then
    handlers.notification("command/state", { commandId = step.commandId, state = step.state, flowId = id })
  end
  if flows[id] and type(result.state) == "string" and result.state ~= flows[id].state then
    handlers.notification("flow/state", { flowId = id, state = result.state })
  end
end

--- After a (re)start: the documents opened again, our flows and calls
--- watched on this connection, and their states asked (they moved on
--- while no server listened).
local function resume()
  for _, doc in pairs(docs) do
    doc.version = doc.version + 1
    open(doc)
  end
  local flow_ids, command_ids = {}, {}
  for id, info in pairs(flows) do
    flow_ids[#flow_ids + 1] = id
    if info.command and not TERMINAL[info.command_state or ""] then
      command_ids[#command_ids + 1] = info.command
    end
  end
  if #flow_ids > 0 then
    connection.request("flow/watch", { flowIds = flow_ids }, function() end)
    for _, id in ipairs(flow_ids) do
      connection.request("flow/show", { flowId = id }, function(err, result)
        if err and err.code == -32007 and flows[id] then -- an unknown flow: never to end
          handlers.notification("flow/state", { flowId = id, state = "failed" })
        elseif not err then
          sync_flow(id, result)
        end
      end)
    end
  end
  if #command_ids > 0 then
    connection.request("command/watch", { commandIds = command_ids }, function() end)
  end
end

--- Start the server if none runs.  Returns true, or false and why not.
ensure = function()
  if connection.live() then
    return true
  end
  stopping = false
  local cwd = M.config.cwd and vim.fn.expand(M.config.cwd) or (vim.uv or vim.loop).cwd()
  initialized = false
  local started, why = connection.start(M.config.server_cmd, cwd, {
    notification = function(method, params)
      handlers.notification(method, params)
    end,
    request = function(method, params)
      return handlers.request(method, params)
    end,
    exit = function()
      for _, doc in pairs(docs) do
        doc.opened = nil
      end
      if next(asking) then
        -- Their answers died with the server: we cannot follow them.
        for info in pairs(asking) do
          clear_mark(info)
        end
        asking, expected = {}, 0
        say("the server died before it answered a correction; it may still land", vim.log.levels.WARN)
      end
      if not initialized then
        -- It died before it answered: wait longer each time, say so once.
        reconnect_wait = math.min(60, 2 * (reconnect_wait or M.config.reconnect_delay))
        if not start_failure_shown then
          start_failure_shown = true
          say("the server " .. vim.inspect(M.config.server_cmd) .. " exited before it answered; retrying "
            .. "(see server_cmd in setup(), and its output in " .. vim.lsp.get_log_path() .. ")",
            vim.log.levels.ERROR)
        end
      end
      initialized = false
      if not stopping then
        schedule_reconnect()
      end
    end,
  })
  if not started then
    return false, why
  end
  connection.request("initialize", { clientInfo = { name = "neovim" } }, function(err)
    if err then
      say("the server refused initialize: " .. (err.message or "?"), vim.log.levels.ERROR)
    else
      initialized = true
      reconnect_wait = nil
      start_failure_shown = false
    end
  end)
  resume()
  return true
end

-- Documents -----------------------------------------------------------------

local function uri_of(bufnr)
  local name = api.nvim_buf_get_name(bufnr)
  if name ~= "" then
    return "file://" .. vim.fn.fnamemodify(name, ":p")
  end
  return "buffer://" .. bufnr
end

local function on_bytes(_, bufnr, _, ...)
  local doc = docs[bufnr]
  if not doc then
    return true -- detach
  end
  doc.version = doc.version + 1
  local change = doc:on_bytes(...)
  if doc.opened ~= connection.generation() or not connection.live() then
    if change == nil then
      doc:reload()
    end
    doc.opened = nil
    schedule_reconnect()
    return
  end
  if change == nil then
    doc:reload()
    open(doc)
  elseif not connection.notify("document/change", { uri = doc.uri, version = doc.version, changes = { change } }) then
    doc.opened = nil
    schedule_reconnect()
  end
end

local function attach_buffer(bufnr, version)
  local doc = document.new(bufnr)
  doc.uri = uri_of(bufnr)
  doc.version = version
  docs[bufnr] = doc
  api.nvim_buf_attach(bufnr, false, {
    on_bytes = on_bytes,
    on_reload = function()
      if docs[bufnr] == doc then
        doc.version = doc.version + 1
        doc:reload()
        open(doc)
      end
    end,
    on_detach = function()
      -- `:edit!` detaches too, then loads the buffer again: a document
      -- still loaded is attached anew, its text sent whole (the server
      -- moves its regions through the difference).
      vim.schedule(function()
        if docs[bufnr] ~= doc then
          return
        end
        if api.nvim_buf_is_loaded(bufnr) then
          attach_buffer(bufnr, doc.version + 1)
        else
          docs[bufnr] = nil
          connection.notify("document/close", { uri = doc.uri })
        end
      end)
    end,
  })
  -- Saved: what the corrected regions hold is what the person kept.
  api.nvim_create_autocmd("BufWritePost", {
    buffer = bufnr,
    callback = function()
      if docs[bufnr] == doc and doc.opened == connection.generation() then
        connection.notify("document/save", { uri = doc.uri, version = doc.version })
      end
    end,
  })
  open(doc)
  return doc
end

--- Make buffer `bufnr` (default: the current one) a document the server
--- mirrors, starting the server if need be.  Returns its Document, or nil
--- and why not.
function M.attach(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and api.nvim_get_current_buf() or bufnr
  local ok, why = ensure()
  if not ok then
    return nil, why
  end
  local doc = docs[bufnr]
  if doc then
    if doc.opened ~= connection.generation() then
      open(doc)
    end
    return doc
  end
  return attach_buffer(bufnr, 0)
end

--- Stop mirroring buffer `bufnr`.
function M.detach(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and api.nvim_get_current_buf() or bufnr
  local doc = docs[bufnr]
  if doc then
    docs[bufnr] = nil
    connection.notify("document/close", { uri = doc.uri })
  end
end

local function doc_of(uri)
  for bufnr, doc in pairs(docs) do
    if doc.uri == uri and api.nvim_buf_is_loaded(bufnr) then
      return doc
    end
  end
end

--- Break the undo sequence of `bufnr`: what comes next is a new undo block.
--- (Setting 'undolevels', even to its own value, does that.)
local function undo_break(bufnr)
  api.nvim_buf_call(bufnr, function()
    vim.go.undolevels = vim.go.undolevels
  end)
end

local CTRL_G_U = api.nvim_replace_termcodes("<C-g>u", true, false, true)

--- Apply `edits` (code point ranges, last first) to `doc` as one undo block
--- of its own, never joined with the typing around it; cursors keep their
--- place in the text.
local function apply_edits(doc, edits)
  local bufnr = doc.bufnr
  local total = doc:length()
  local function offset(n)
    return type(n) == "number" and n >= 0 and n <= total and math.floor(n) == n
  end
  for _, edit in ipairs(edits) do
    if type(edit) ~= "table" or type(edit.text) ~= "string" or not offset(edit.start)
      or not offset(edit["end"]) or edit.start > edit["end"] then
      return false
    end
  end
  local cursors = {}
  for _, win in ipairs(api.nvim_list_wins()) do
    if api.nvim_win_get_buf(win) == bufnr then
      local pos = api.nvim_win_get_cursor(win)
      local ok, mark = pcall(api.nvim_buf_set_extmark, bufnr, cursor_ns, pos[1] - 1, pos[2], {})
      if ok then
        cursors[win] = mark
      end
    end
  end
  undo_break(bufnr)
  local ok, err = pcall(function()
    for _, edit in ipairs(edits) do
      if not doc:replace(edit.start, edit["end"], edit.text) then
        error("edit out of range")
      end
    end
  end)
  undo_break(bufnr)
  -- Insert mode saved the line it types on when it began: keys typed on
  -- that line from now on would be undone with the model's edit.  CTRL-G u
  -- (put before any keys still waiting) makes it save the line again.
  local mode = api.nvim_get_mode().mode:sub(1, 1)
  if api.nvim_get_current_buf() == bufnr and (mode == "i" or mode == "R") then
    api.nvim_feedkeys(CTRL_G_U, "ni", false)
  end
  for win, mark in pairs(cursors) do
    local pos = api.nvim_buf_get_extmark_by_id(bufnr, cursor_ns, mark, {})
    if pos[1] and api.nvim_win_is_valid(win) and api.nvim_win_get_buf(win) == bufnr then
      pcall(api.nvim_win_set_cursor, win, { pos[1] + 1, pos[2] })
    end
  end
  api.nvim_buf_clear_namespace(bufnr, cursor_ns, 0, -1)
  if not ok then
    say("cannot apply an edit: " .. tostring(err), vim.log.levels.WARN)
  end
  return ok
end

function handlers.request(method, params)
  if method == "document/applyEdit" then
    local doc = type(params) == "table" and doc_of(params.uri)
    local applied = doc ~= nil
      and doc.opened == connection.generation()
      and params.version == doc.version
      and type(params.edits) == "table"
      and apply_edits(doc, params.edits)
    return { applied = applied and true or false }
  end
  return nil, vim.lsp.rpc.rpc_response_error(vim.lsp.protocol.ErrorCodes.MethodNotFound,
    "dovecote.nvim has no method " .. tostring(method))
end

--- Answer a `document/applyEdit` request as if the server sent it (tests).
function M._apply(params)
  return handlers.request("document/applyEdit", params)
end

-- Corrections ---------------------------------------------------------------

local function remember_call(id, flow_id, bufnr)
  if not calls[id] then
    call_order[#call_order + 1] = id
  end
  calls[id] = { flow = flow_id, bufnr = bufnr }
end

local function show_progress(info, text)
  if not info.mark or not api.nvim_buf_is_valid(info.bufnr) then
    return
  end
  local pos = api.nvim_buf_get_extmark_by_id(info.bufnr, ns, info.mark, { details = true })
  if not pos[1] then
    return
  end
  local details = pos[3] or {}
  local lines = vim.split(text or "", "\n", { plain = true })
  local last = lines[#lines] ~= "" and lines[#lines] or (lines[#lines - 1] or "")
  if #last > 60 then
    last = "…" .. last:sub(-60)
  end
  info.progress = text
  pcall(api.nvim_buf_set_extmark, info.bufnr, ns, pos[1], pos[2], {
    id = info.mark,
    end_row = details.end_row,
    end_col = details.end_col,
    hl_group = "DovecotePending",
    virt_text = { { " ⋯ " .. last, "DovecoteProgress" } },
    virt_text_pos = "eol",
  })
end

--- Whether the correction `info` waits for a person: its call is dead (a
--- dead letter to replay), or its flow is stalled.
local function stalled(info)
  return info.command_state == "dead" or (info.command_state == nil and info.state == "stalled")
end

--- The number of this Neovim's corrections still to land (a stalled one
--- counts again once its dead letter is replayed).
function M.pending()
  local n = expected
  for _, info in pairs(flows) do
    if not stalled(info) then
      n = n + 1
    end
  end
  return n
end

--- For 'statusline': "dove", the pending count after a colon, "!" while the
--- server is not running; "" before dovecote is used.
function M.status()
  if next(docs) == nil and next(flows) == nil and expected == 0 then
    return ""
  end
  local n = M.pending()
  return "dove" .. (n > 0 and (":" .. n) or "") .. (connection.live() and "" or "!")
end

local function show_conflicts(id, result)
  require("dovecote.ui").conflicts(id, result, calls[id] and calls[id].bufnr)
end

local function step_finished(id, state, params)
  if state == "dead" then
    say(string.format("a correction is stalled: its call %s is dead (%s); :DovecoteDead replays it",
      id:sub(-8), params.reason or "?"), vim.log.levels.WARN)
  elseif state == "done" then
    connection.request("command/show", { commandId = id }, function(err, result)
      if not err and type(result) == "table" and (tonumber(result.unresolved) or 0) > 0 then
        show_conflicts(id, result)
      end
    end)
  end
end

local function flow_finished(id, info, state)
  clear_mark(info)
  if state == "completed" then
    say(string.format("correction %s landed (%d pending)", id:sub(-8), M.pending()))
  elseif state == "cancelled" then
    say("correction " .. id:sub(-8) .. " was cancelled")
  elseif state == "failed" then
    connection.request("flow/show", { flowId = id }, function(_, result)
      say("correction " .. id:sub(-8) .. " failed: " .. tostring(type(result) == "table" and result.error or "?"),
        vim.log.levels.WARN)
    end)
  end
end

local notification = {}

notification["flow/state"] = function(params)
  local id, state = params.flowId, params.state
  local info = flows[id]
  if not info then
    if expected > 0 and id then
      early[id] = early[id] or {}
      table.insert(early[id], { "flow/state", params })
    end
  elseif FLOW_TERMINAL[state] then
    flows[id] = nil
    flow_finished(id, info, state)
  else
    if info.state == "stalled" and state ~= "stalled" and info.command_state == "dead" then
      info.command_state = nil -- its dead step was replayed elsewhere
    end
    info.state = state
  end
  vim.cmd("redrawstatus!")
end

notification["command/state"] = function(params)
  local id, state, flow_id = params.commandId, params.state, params.flowId
  local info = flow_id and flows[flow_id]
  if not info then
    if flow_id and expected > 0 then
      early[flow_id] = early[flow_id] or {}
      table.insert(early[flow_id], { "command/state", params })
    end
    return
  end
  if id == info.command and (state == info.command_state or TERMINAL[info.command_state or ""]) then
    return -- nothing new, or older than a terminal state
  end
  if id ~= info.command then
    -- Its progress goes only to the connections watching it.
    connection.request("command/watch", { commandIds = { id } }, function() end)
  end
  info.command, info.command_state = id, state
  remember_call(id, flow_id, info.bufnr)
  if TERMINAL[state] then
    step_finished(id, state, params)
  end
  vim.cmd("redrawstatus!")
end

notification["command/progress"] = function(params)
  for _, info in pairs(flows) do
    if info.command == params.commandId then
      show_progress(info, params.text)
    end
  end
end

notification["human/ask"] = function(params)
  local parts = { params.system }
  for _, message in ipairs(params.messages or {}) do
    parts[#parts + 1] = type(message) == "table" and message.content or nil
  end
  local question = table.concat(vim.tbl_filter(function(p)
    return type(p) == "string"
  end, parts), "\n\n")
  vim.ui.input({ prompt = "dovecote asks: " .. question .. "\nYour answer: " }, function(answer)
    if answer and answer ~= "" then
      connection.request("command/reply", { commandId = params.commandId, reply = { text = answer } },
        function(err, result)
          if err then
            say("the answer was refused: " .. (err.message or "?"), vim.log.levels.WARN)
          elseif type(result) == "table" and result.accepted ~= true then
            say("the answer came too late; it is kept with the dead call")
          end
        end)
    end
  end)
end

notification["server/error"] = function(params)
  say("the server refused " .. tostring(params.method) .. ": " .. tostring(params.message), vim.log.levels.WARN)
  if params.method == "document/change" or params.method == "document/open" then
    for _, doc in pairs(docs) do
      doc.version = doc.version + 1
      doc:reload()
      open(doc)
    end
  end
end

function handlers.notification(method, params)
  local run = notification[method]
  if run and type(params) == "table" then
    run(params)
  end
end

local function claim(id, info)
  flows[id] = info
  local queued = early[id] or {}
  early[id] = nil
  for _, item in ipairs(queued) do
    handlers.notification(item[1], item[2])
  end
  if expected == 0 then
    early = {}
  end
end

--- Ask for corrections of the region from (sr, sc) to (er, ec) of buffer
--- `bufnr` (0-based rows, byte columns, end exclusive); returns at once.
function M.correct(bufnr, sr, sc, er, ec)
  bufnr = (bufnr == nil or bufnr == 0) and api.nvim_get_current_buf() or bufnr
  local doc, why = M.attach(bufnr)
  if not doc then
    say("cannot start the server: " .. why, vim.log.levels.ERROR)
    return nil
  end
  local start, finish = doc:offset(sr, sc), doc:offset(er, ec)
  if not start or not finish or start >= finish then
    say("the region is empty", vim.log.levels.WARN)
    return nil
  end
  local mark = api.nvim_buf_set_extmark(bufnr, ns, sr, sc, {
    end_row = er, end_col = ec, hl_group = "DovecotePending",
  })
  local info = { bufnr = bufnr, mark = mark, state = "running" }
  local params = { instruction = M.config.instruction, adapter = M.config.adapter, timeout = M.config.timeout }
  expected = expected + 1
  asking[info] = true
  local function release()
    asking[info] = nil
    expected = math.max(0, expected - 1)
    vim.cmd("redrawstatus!")
  end
  -- What is typed from now on is sent after this request: the server takes
  -- the region's snapshot before it reads the next message.
  local sent = connection.request("flow/start", {
    flow = "corrections",
    params = params,
    target = { uri = doc.uri, start = start, ["end"] = finish, version = doc.version },
    onConflict = M.config.on_conflict,
  }, function(err, result)
    release()
    if err or type(result) ~= "table" or not result.flowId then
      clear_mark(info)
      say("the correction was not asked for: " .. tostring(err and err.message or "no flow id"),
        vim.log.levels.ERROR)
    else
      claim(result.flowId, info)
    end
  end)
  if not sent then
    release()
    clear_mark(info)
    say("the server is not running", vim.log.levels.ERROR)
    return nil
  end
  vim.cmd("redrawstatus!")
  return true
end

--- The corrections of buffer `bufnr` whose region holds (row, col), or all
--- of them when `row` is nil: a list of flow ids.
function M.flows_at(bufnr, row, col)
  local ids = {}
  for id, info in pairs(flows) do
    if info.bufnr == bufnr then
      local hit = row == nil
      if not hit and info.mark then
        local pos = api.nvim_buf_get_extmark_by_id(bufnr, ns, info.mark, { details = true })
        local d = pos[3] or {}
        if pos[1] then
          local after_start = row > pos[1] or (row == pos[1] and col >= pos[2])
          local before_end = row < d.end_row or (row == d.end_row and col <= d.end_col)
          hit = after_start and before_end
        end
      end
      if hit then
        ids[#ids + 1] = id
      end
    end
  end
  return ids
end

local function cancel_one(method, params, id)
  connection.request(method, params, function(err)
    if err then
      say("cannot cancel " .. id:sub(-8) .. ": " .. (err.message or "?"), vim.log.levels.WARN)
    end
  end)
end

--- Cancel the corrections `ids` (flow ids).
function M.cancel(ids)
  if ensure() then
    for _, id in ipairs(ids) do
      cancel_one("flow/cancel", { flowId = id }, id)
    end
  end
end

--- Cancel one call (a command id): the correction it is the step of, if ours.
function M.cancel_call(id)
  local call = calls[id]
  if call and call.flow and flows[call.flow] then
    M.cancel({ call.flow })
  elseif ensure() then
    cancel_one("command/cancel", { commandId = id }, id)
  end
end

--- Replay the dead calls `ids` with `timeout` seconds each (nil: the
--- configured replay_timeout or timeout, else each call's own).  A
--- stalled correction of ours goes on and lands.  Returns the new ids.
function M.replay(ids, timeout)
  local ok, why = ensure()
  if not ok then
    say(why, vim.log.levels.ERROR)
    return {}
  end
  timeout = timeout or M.config.replay_timeout or M.config.timeout
  local result, err = connection.request_sync("deadletter/replay", { commandIds = ids, timeout = timeout })
  if not result then
    say("replay failed: " .. err, vim.log.levels.ERROR)
    return {}
  end
  local new = {}
  for _, pair in ipairs(result.replayed or {}) do
    local old = calls[pair.from]
    remember_call(pair.to, old and old.flow, old and old.bufnr)
    if old and old.flow and flows[old.flow] and flows[old.flow].command == pair.from then
      local info = flows[old.flow]
      info.command, info.command_state = pair.to, "pending"
    end
    new[#new + 1] = pair.to
  end
  vim.cmd("redrawstatus!")
  return new
end

--- This Neovim's calls, oldest first: a list of command ids.
function M.calls()
  return vim.deepcopy(call_order)
end

function M.call_info(id)
  return calls[id]
end

--- Send a request and wait for its answer (for the lists).
function M.request_sync(method, params, timeout_ms)
  local ok, why = ensure()
  if not ok then
    return nil, why
  end
  return connection.request_sync(method, params, timeout_ms)
end

--- Send a request; `callback(err, result)` on the main loop.
function M.request(method, params, callback)
  local ok = ensure()
  return ok and connection.request(method, params, callback)
end

--- Stop the server and forget every document and call (the calls go on in
--- the server's database; the next start picks up none of them).
function M.shutdown()
  stopping = true
  if reconnect_timer then
    reconnect_timer:stop()
    reconnect_timer = nil
  end
  for _, info in pairs(flows) do
    clear_mark(info)
  end
  for bufnr in pairs(docs) do
    docs[bufnr] = nil
  end
  for id in pairs(flows) do
    flows[id] = nil
  end
  for id in pairs(calls) do
    calls[id] = nil
  end
  for i = #call_order, 1, -1 do
    call_order[i] = nil
  end
  expected, early, asking, reconnect_wait, start_failure_shown = 0, {}, {}, nil, false
  connection.stop()
end

--- The server's process id (for tests and :checkhealth-like curiosity).
function M.server_pid()
  return connection.pid()
end

function M.setup(opts)
  opts = opts or {}
  for key in pairs(opts) do
    if defaults[key] == nil and key ~= "cwd" and key ~= "timeout" and key ~= "replay_timeout" then
      say("setup(): unknown option " .. tostring(key), vim.log.levels.WARN)
    end
  end
  M.config = vim.tbl_extend("force", vim.deepcopy(defaults), opts)
  local policies = { ask = true, drop = true, markers = true, theirs = true }
  if not policies[M.config.on_conflict] then
    say("setup(): on_conflict must be ask, drop, markers or theirs", vim.log.levels.ERROR)
    M.config.on_conflict = defaults.on_conflict
  end
  vim.api.nvim_set_hl(0, "DovecotePending", { default = true, link = "Visual" })
  vim.api.nvim_set_hl(0, "DovecoteProgress", { default = true, link = "Comment" })
end

return M
