-- The headless test runner of dovecote.nvim.  Run from the top of the
-- repository (tests/test_nvim.py does this):
--
--   DOVECOTE=$PWD/.venv/bin/dovecote nvim --headless -u NONE -i NONE \
--     --cmd 'set rtp^=editor_bridge/nvim' -c 'luafile editor_bridge/nvim/tests/run.lua'
--
-- DOVECOTE names the dovecote executable; DOVECOTE_NVIM_TESTS, a comma
-- separated list, runs only those tests; DOVECOTE_NVIM_RESULTS names a file
-- that receives {name: {ok, error, seconds}} as JSON.  Each test runs in a
-- coroutine against its own server and database, and yields to the event
-- loop while it waits, so timers, typed keys and the server's messages run
-- as they would for a person.
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
local executable = os.getenv("DOVECOTE") or "dovecote"
local only = {}
for name in (os.getenv("DOVECOTE_NVIM_TESTS") or ""):gmatch("[^,]+") do
  only[name] = true
end
local tmp = vim.fn.tempname()
vim.fn.mkdir(tmp, "p")

local T = { executable = executable, tmp = tmp, root = vim.fn.fnamemodify(here .. "..", ":p"):gsub("/$", "") }
local tests = {}

function T.test(name, fn)
  tests[#tests + 1] = { name = name, fn = fn }
end

local current

--- Sleep `ms` milliseconds, the event loop running.
function T.sleep(ms)
  local co, resume = coroutine.running(), current.resume
  vim.defer_fn(function()
    resume(co)
  end, ms)
  coroutine.yield()
end

--- Wait until `predicate()` is true, at most `ms` (default 15 s); fail
--- naming `what`.
function T.wait_for(predicate, what, ms)
  local deadline = vim.loop.now() + (ms or 15000)
  while true do
    local ok, value = pcall(predicate)
    if ok and value then
      return value
    end
    if vim.loop.now() > deadline then
      error("timed out waiting for " .. what .. (ok and "" or (": " .. tostring(value))), 2)
    end
    T.sleep(20)
  end
end

function T.eq(want, got, what)
  if not vim.deep_equal(want, got) then
    error(string.format("%s:\n  want %s\n  got  %s", what or "values differ", vim.inspect(want), vim.inspect(got)), 2)
  end
end

function T.truthy(value, what)
  if not value then
    error((what or "expected a true value") .. ", got " .. vim.inspect(value), 2)
  end
  return value
end

--- A new buffer holding `text` (lines split on "\n"), current in the window.
function T.buffer(text)
  local bufnr = vim.api.nvim_create_buf(true, false)
  vim.api.nvim_buf_set_lines(bufnr, 0, -1, false, vim.split(text, "\n", { plain = true }))
  vim.api.nvim_win_set_buf(0, bufnr)
  vim.api.nvim_buf_set_option(bufnr, "undolevels", 1000)
  return bufnr
end

function T.text(bufnr)
  return table.concat(vim.api.nvim_buf_get_lines(bufnr, 0, -1, false), "\n")
end

--- The (row, byte col) of the first `needle` in the buffer, 0-based, and
--- the position just after it.
function T.find(bufnr, needle, after_it)
  for row, line in ipairs(vim.api.nvim_buf_get_lines(bufnr, 0, -1, false)) do
    local s, e = line:find(needle, 1, true)
    if s then
      if after_it then
        return row - 1, e
      end
      return row - 1, s - 1
    end
  end
  error("no " .. needle .. " in the buffer", 2)
end

--- Replace the first `old` with `new`, as a person would (its own undo block).
function T.replace(bufnr, old, new)
  local r, c = T.find(bufnr, old)
  T.edit(bufnr, r, c, r, c + #old, new)
end

--- A person's edit through nvim_buf_set_text: a new undo block, which
--- stays open (as typing does) until the next begins; a model edit that
--- lands meanwhile must close it itself.
function T.edit(bufnr, sr, sc, er, ec, text)
  vim.api.nvim_buf_call(bufnr, function()
    vim.go.undolevels = vim.go.undolevels
  end)
  vim.api.nvim_buf_set_text(bufnr, sr, sc, er, ec, vim.split(text, "\n", { plain = true }))
end

--- Correct the text from the first `from` to the end of the first `to`.
function T.correct(bufnr, from, to)
  local sr, sc = T.find(bufnr, from)
  local er, ec = T.find(bufnr, to, true)
  return T.truthy(require("dovecote").correct(bufnr, sr, sc, er, ec), "a correction asked for")
end

--- Wait until every correction of this Neovim is over.
function T.settle(what, ms)
  local dovecote = require("dovecote")
  T.wait_for(function()
    return dovecote.pending() == 0 and next(dovecote._state.flows) == nil
  end, what or "every correction to land", ms)
end

--- Have `hook(method, params, answer)` see every server request before
--- dovecote.nvim does; `answer()` lets dovecote.nvim answer it.
local connection = require("dovecote.connection")
local real_start = connection.start
function T.intercept(hook)
  connection.start = function(cmd, cwd, handlers)
    local request = handlers.request
    handlers = vim.tbl_extend("force", handlers, {
      request = function(method, params)
        return hook(method, params, function()
          return request(method, params)
        end)
      end,
    })
    return real_start(cmd, cwd, handlers)
  end
end

--- Wait until the step command of the (one) pending correction is in
--- `state`; its record in dovecote.nvim.
function T.step_is(state, what)
  return T.wait_for(function()
    local _, info = next(require("dovecote")._state.flows)
    return info and info.command_state == state and info
  end, what)
end

--- Wait for a conflict buffer to open; its number.
function T.conflict_buffer()
  return T.wait_for(function()
    local _, bufnr = next(require("dovecote.ui").conflict_buffers())
    return bufnr
  end, "the conflict buffer")
end

--- Messages given with vim.notify since the test began.
T.messages = {}

function T.db(name)
  return tmp .. "/" .. name .. ".db"
end

function T.setup(opts)
  local dovecote = require("dovecote")
  dovecote.setup(vim.tbl_extend("force", {
    server_cmd = { executable, "serve", "--stdio", "--db", T.db(current.name) },
    cwd = tmp,
    reconnect_delay = 0.05,
  }, opts or {}))
end

vim.o.report = 99999 -- no "3 more lines" on the terminal
vim.o.showmode = false
vim.o.shortmess = vim.o.shortmess .. "FW"
_G.dovecote_test = T
dofile(here .. "cases.lua")

local results = {}
local index = 0
local run_next

vim.notify = function(message)
  table.insert(T.messages, message)
end

local function finish()
  local failed = 0
  for _, t in ipairs(tests) do
    local r = results[t.name]
    if r then
      io.stdout:write(string.format("%s %s (%.1fs)\n", r.ok and "ok  " or "FAIL", t.name, r.seconds))
      if not r.ok then
        failed = failed + 1
        io.stdout:write("     " .. tostring(r.error):gsub("\n", "\n     ") .. "\n")
      end
    end
  end
  local path = os.getenv("DOVECOTE_NVIM_RESULTS")
  if path then
    local file = io.open(path, "w")
    file:write(vim.json.encode(results))
    file:close()
  end
  vim.fn.delete(tmp, "rf")
  vim.cmd(failed > 0 and "cquit 1" or "qall!")
end

local function clean_up()
  require("dovecote").shutdown()
  connection.start = real_start
  for _, b in ipairs(vim.api.nvim_list_bufs()) do
    pcall(vim.api.nvim_buf_delete, b, { force = true })
  end
  vim.cmd("silent! only")
  vim.ui.input = function()
    error("no question was expected")
  end
  T.messages = {}
end

run_next = function()
  index = index + 1
  local t = tests[index]
  if not t then
    return finish()
  end
  if next(only) and not only[t.name] then
    return run_next()
  end
  clean_up()
  local started = vim.loop.hrtime()
  local done = false
  local function over(ok, err)
    if done then
      return
    end
    done = true
    local seconds = (vim.loop.hrtime() - started) / 1e9
    results[t.name] = { ok = ok, error = err and tostring(err) or vim.NIL, seconds = seconds }
    vim.schedule(run_next)
  end
  current = {
    name = t.name,
    resume = function(co)
      if done or coroutine.status(co) ~= "suspended" then
        return
      end
      local ok, err = coroutine.resume(co)
      if not ok then
        over(false, debug.traceback(co, err))
      elseif coroutine.status(co) == "dead" then
        over(true)
      end
    end,
  }
  T.setup()
  local co = coroutine.create(t.fn)
  vim.defer_fn(function()
    over(false, "the test took more than 30 s")
  end, 30000)
  current.resume(co)
end

vim.schedule(run_next)
