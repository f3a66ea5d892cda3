--- The one connection to `dovecote serve --stdio`, through Neovim's own
--- `vim.lsp.rpc` (LSP framing, as the server speaks).
---
--- Each start is a new generation: a late exit or answer of an earlier
--- server is recognised by its generation and ignored.  Answers and
--- notifications reach the handlers on the main loop (vim.lsp.rpc schedules
--- them), so handlers may use the whole API.
local M = {}

local generation = 0
local client = nil

M.generation = function()
  return generation
end

--- True while a server runs.
function M.live()
  return client ~= nil
end

local function spawn(cmd, dispatchers, extra)
  if vim.fn.has("nvim-0.10") == 1 then
    return vim.lsp.rpc.start(cmd, dispatchers, extra)
  end
  local args = {}
  for i = 2, #cmd do
    args[#args + 1] = cmd[i]
  end
  return vim.lsp.rpc.start(cmd[1], args, dispatchers, extra)
end

--- Start the server `cmd` (a list: the program and its arguments) in
--- directory `cwd`; `handlers` has notification(method, params),
--- request(method, params) -> result and exit(generation).  Returns the
--- new generation, or nil and why not.
function M.start(cmd, cwd, handlers)
  M.stop()
  local program = vim.fn.expand(cmd[1])
  if vim.fn.executable(program) ~= 1 then
    return nil, string.format("no program %q (see server_cmd in setup())", cmd[1])
  end
  local full = vim.deepcopy(cmd)
  full[1] = program
  generation = generation + 1
  local mine = generation
  local ok, started = pcall(spawn, full, {
    notification = function(method, params)
      if mine == generation then
        handlers.notification(method, params)
      end
    end,
    server_request = function(method, params)
      if mine ~= generation then
        return nil, vim.lsp.rpc.rpc_response_error(vim.lsp.protocol.ErrorCodes.InternalError)
      end
      return handlers.request(method, params)
    end,
    on_exit = function()
      -- Called from libuv, not the main loop.
      vim.schedule(function()
        if mine == generation then
          client = nil
          handlers.exit(mine)
        end
      end)
    end,
  }, { cwd = cwd })
  if not ok or not started then
    return nil, tostring(started or "the server did not start")
  end
  client = started
  return mine
end

--- Stop the server, if one runs; its exit is not reported.
function M.stop()
  local old = client
  client = nil
  generation = generation + 1
  if old then
    pcall(old.notify, "exit", nil)
    if old.terminate then
      pcall(old.terminate)
    elseif old.handle and not old.handle:is_closing() then
      pcall(old.handle.kill, old.handle, 15)
    end
  end
end

--- The server's process id, or nil.
function M.pid()
  return client and client.pid
end

--- Send a notification; false when no server runs.
function M.notify(method, params)
  if not client then
    return false
  end
  return client.notify(method, params) ~= false
end

--- Send a request; `callback(err, result)` runs on the main loop.  False
--- when no server runs.
function M.request(method, params, callback)
  if not client then
    return false
  end
  local mine = generation
  return client.request(method, params, function(err, result)
    if mine == generation then
      callback(err, result)
    end
  end) ~= false
end

--- Send a request and wait for its answer (for commands a person runs):
--- result, or nil and an error message.
function M.request_sync(method, params, timeout_ms)
  local done, answer, failure = false, nil, nil
  local sent = M.request(method, params, function(err, result)
    done, answer, failure = true, result, err
  end)
  if not sent then
    return nil, "the dovecote server is not running"
  end
  if not vim.wait(timeout_ms or 10000, function()
    return done
  end, 10) then
    return nil, method .. ": no answer from the server"
  end
  if failure then
    return nil, failure.message or tostring(failure)
  end
  return answer
end

return M
