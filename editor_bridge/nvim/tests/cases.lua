-- The cases of the headless suite (run.lua runs them).
local T = _G.dovecote_test
local test, eq = T.test, T.eq

test("typing_before_inside_and_after", function()
  local dovecote = require("dovecote")
  local b = T.buffer("Dear 🦆 friend,\n#delay 1\nI recieve teh letter and beleive every word of it.\nYours, Ann")
  T.correct(b, "#delay", "of it.")
  eq(1, dovecote.pending(), "pending once asked")
  local last = vim.api.nvim_buf_line_count(b)
  local tail = vim.api.nvim_buf_get_lines(b, last - 1, last, false)[1]
  T.edit(b, last - 1, #tail, last - 1, #tail, " (sent from my 📱)")
  T.replace(b, "every word", "each and every word")
  T.edit(b, 0, 0, 0, 0, "Re: your note\n")
  eq(1, dovecote.pending(), "still pending while typing")
  eq("dove:1", dovecote.status(), "the statusline")
  T.settle()
  eq("Re: your note\nDear 🦆 friend,\nI receive the letter and believe each and every word of it.\n"
    .. "Yours, Ann (sent from my 📱)", T.text(b), "the buffer")
  eq("dove", dovecote.status(), "the statusline once landed")
end)

test("multibyte_offsets", function()
  local b = T.buffer("Ça va? 🦆🦆 日本語のテキスト: teh duck.\n#delay 0.5\nCafé: recieve 🦆 teh 文字.\nEnd 🎉")
  T.correct(b, "#delay", "文字.")
  T.edit(b, 0, 0, 0, 0, "🐣 ")
  T.replace(b, "End", "終わり")
  T.replace(b, "🦆 teh", "🦆🦆 teh")
  T.settle()
  eq("🐣 Ça va? 🦆🦆 日本語のテキスト: teh duck.\nCafé: receive 🦆🦆 the 文字.\n終わり 🎉", T.text(b), "the buffer")
end)

test("offsets_agree_with_the_server_for_every_kind_of_edit", function()
  -- Each edit's offsets, as sent, rebuild the buffer's text exactly: what
  -- the server's mirror holds is what the buffer holds.
  local dovecote = require("dovecote")
  local b = T.buffer("a🦆b\n\nçé日\nlast")
  local doc = dovecote.attach(b)
  local mirror = doc:text()
  local sent = {}
  local connection = require("dovecote.connection")
  local notify = connection.notify
  connection.notify = function(method, params)
    if method == "document/change" then
      for _, c in ipairs(params.changes) do
        sent[#sent + 1] = c
      end
    elseif method == "document/open" then
      sent[#sent + 1] = { open = params.text }
    end
    return notify(method, params)
  end
  local function apply(c)
    if c.open then
      mirror = c.open
      return
    end
    local chars = vim.fn.split(mirror, "\\zs")
    local out = {}
    for i = 1, c.start do
      out[#out + 1] = chars[i]
    end
    out[#out + 1] = c.text
    for i = c["end"] + 1, #chars do
      out[#out + 1] = chars[i]
    end
    mirror = table.concat(out)
  end
  local api = vim.api
  api.nvim_buf_set_text(b, 0, 1, 0, 5, { "" }) -- delete the duck (4 bytes, 1 code point)
  api.nvim_buf_set_text(b, 2, 2, 2, 2, { "🦆", "new line" })
  api.nvim_buf_set_lines(b, -1, -1, false, { "appended 🎉" })
  api.nvim_buf_set_lines(b, 1, 2, false, {}) -- a whole line removed
  api.nvim_buf_set_text(b, 0, 0, 2, 3, { "joined" })
  vim.cmd("silent %s/e/É/g")
  api.nvim_buf_set_lines(b, 0, -1, false, { "" })
  api.nvim_buf_set_lines(b, 0, 1, false, {})
  api.nvim_buf_set_text(b, 0, 0, 0, 0, { "x\255y" }) -- not UTF-8: one code point, sent as U+FFFD
  vim.cmd("normal! ggdd")
  api.nvim_buf_set_lines(b, 0, -1, false, { "ab", "cd" })
  vim.cmd("normal! ggJ")
  vim.cmd("undo")
  connection.notify = notify
  for _, c in ipairs(sent) do
    apply(c)
  end
  local want = table.concat(api.nvim_buf_get_lines(b, 0, -1, false), "\n") .. "\n"
  eq(want, mirror, "the server's text rebuilt from the changes sent")
  eq(want, doc:text(), "the shadow")
  T.truthy(#sent >= 10, "a change sent for each edit")
end)

test("a_dos_file_keeps_its_line_ends", function()
  local path = T.tmp .. "/dos.txt"
  local file = io.open(path, "wb")
  file:write("#delay 0.3\r\nTeh cat sat on teh mat.\r\nEnd\r\n")
  file:close()
  vim.cmd("edit " .. path)
  local b = vim.api.nvim_get_current_buf()
  eq("dos", vim.bo[b].fileformat, "the fileformat")
  T.correct(b, "#delay", "mat.")
  T.replace(b, "End", "The end")
  T.settle()
  eq("The cat sat on the mat.\nThe end", T.text(b), "the buffer")
  vim.cmd("write")
  file = io.open(path, "rb")
  local bytes = file:read("*a")
  file:close()
  eq("The cat sat on the mat.\r\nThe end\r\n", bytes, "the file written")
end)

test("apply_edit_checks_the_version", function()
  local dovecote = require("dovecote")
  local answers, typed = {}, false
  local b = T.buffer("#delay 0.3\nWe recieve teh plan.")
  T.intercept(function(method, params, answer)
    if method == "document/applyEdit" and not typed then
      -- The person types between the merge and its edit: the edit is for
      -- an older version and must be refused, then merged again.
      typed = true
      T.edit(b, 1, 0, 1, 0, "Now ")
    end
    local result = answer()
    answers[#answers + 1] = { version = params.version, applied = result.applied }
    return result
  end)
  T.correct(b, "#delay", "plan.")
  T.settle()
  eq("Now We receive the plan.", T.text(b), "the buffer")
  eq(false, answers[1].applied, "the stale edit refused")
  eq(true, answers[#answers].applied, "the edit merged again applied")
  T.truthy(answers[#answers].version > answers[1].version, "merged again against the newer version")
  -- Refused for a version that is not the buffer's, or a range past the end.
  local doc = dovecote._state.docs[b]
  T.eq(false, dovecote._apply({ uri = doc.uri, version = doc.version - 1,
    edits = { { start = 0, ["end"] = 1, text = "X" } } }).applied, "an old version")
  T.eq(false, dovecote._apply({ uri = doc.uri, version = doc.version,
    edits = { { start = 0, ["end"] = 999, text = "X" } } }).applied, "a range past the end")
  T.eq(false, dovecote._apply({ uri = "buffer://nothing", version = doc.version,
    edits = {} }).applied, "an unknown document")
  eq("Now We receive the plan.", T.text(b), "the buffer untouched by refused edits")
  -- Last first, each against the text before the edit set.
  T.eq(true, dovecote._apply({ uri = doc.uri, version = doc.version, edits = {
    { start = 5, ["end"] = 6, text = "🦆" }, { start = 0, ["end"] = 1, text = "n" } } }).applied, "applied")
  eq("now W🦆 receive the plan.", T.text(b), "both edits")
end)

test("each_model_edit_is_its_own_undo_block", function()
  -- The reply lands while the person types in Insert mode on another line:
  -- one `u` takes back exactly the model's edit, the typing stays.
  local b = T.buffer("#delay 0.6\nTeh end.\nnotes")
  T.correct(b, "#delay", "end.")
  vim.api.nvim_win_set_cursor(0, { 3, 4 })
  vim.api.nvim_input("A")
  for _, key in ipairs({ " ", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n" }) do
    T.sleep(80)
    vim.api.nvim_input(key)
  end
  T.sleep(50)
  vim.api.nvim_input("<Esc>")
  T.settle()
  T.sleep(50)
  eq("The end.\nnotes abcdefghijklmn", T.text(b), "the buffer")
  vim.cmd("undo")
  eq("#delay 0.6\nTeh end.\nnotes abcdefghijklmn", T.text(b), "after one undo")
end)

test("timeout_listed_and_replayed", function()
  local dovecote = require("dovecote")
  T.setup({ timeout = 0.3 })
  local b = T.buffer("#delay 1\nTeh end.")
  T.correct(b, "#delay", "end.")
  T.wait_for(function()
    local _, info = next(dovecote._state.flows)
    return info and info.command_state == "dead"
  end, "the call to die")
  eq(0, dovecote.pending(), "a stalled correction is not pending")
  eq("dove", dovecote.status(), "the statusline")
  local _, info = next(dovecote._state.flows)
  local dead = info.command
  T.edit(b, 0, 0, 0, 0, "P.S. ")
  local list = require("dovecote.ui").dead()
  local lines = vim.api.nvim_buf_get_lines(list, 0, -1, false)
  T.truthy(lines[3]:find("^" .. dead:sub(-8) .. "  dead/timeout +%d+s  scripted +%[" .. b .. "%] +#delay 1$"),
    "the dead letter listed: " .. lines[3])
  vim.api.nvim_win_set_cursor(0, { 3, 0 })
  vim.api.nvim_feedkeys("5r", "x", false) -- replayed with a 5 s timeout
  eq(1, dovecote.pending(), "pending again")
  lines = vim.api.nvim_buf_get_lines(list, 0, -1, false)
  eq("(none)", lines[3], "the list refreshed")
  T.settle()
  eq("P.S. The end.", T.text(b), "the buffer")
  local calls = dovecote.calls()
  eq(2, #calls, "two calls made")
  local show = dovecote.request_sync("command/show", { commandId = calls[2] })
  eq(5, show.command.timeout, "the replay's timeout")
  eq(dead, show.command.replayOf, "a replay of the dead call")
  -- :DovecoteList shows both, newest first; <CR> shows one with its journal.
  vim.cmd("DovecoteList")
  lines = vim.api.nvim_buf_get_lines(0, 0, -1, false)
  T.truthy(lines[3]:find("^" .. calls[2]:sub(-8) .. "  done "), "the replay listed: " .. lines[3])
  T.truthy(lines[4]:find("^" .. dead:sub(-8) .. "  dead/timeout "), "the dead call listed: " .. lines[4])
  vim.api.nvim_win_set_cursor(0, { 4, 0 })
  vim.api.nvim_feedkeys("\r", "x", false)
  local shown = table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "\n")
  T.truthy(shown:find("Call " .. dead, 1, true), "the call shown")
  T.truthy(shown:find("sent     %-> dead "), "its journal: " .. shown)
end)

test("cancel", function()
  local dovecote = require("dovecote")
  local b = T.buffer("Intro.\n#hang\nTeh end.")
  T.correct(b, "#hang", "end.")
  T.wait_for(function()
    local _, info = next(dovecote._state.flows)
    return info and info.command_state == "sent"
  end, "the call to be sent")
  vim.api.nvim_win_set_cursor(0, { 1, 0 })
  vim.cmd("DovecoteCancel")
  T.truthy(T.messages[#T.messages]:find("no correction pending under the cursor"), "nothing under the cursor")
  vim.api.nvim_win_set_cursor(0, { 3, 2 })
  vim.cmd("DovecoteCancel")
  T.settle("the cancel")
  eq({}, vim.api.nvim_buf_get_extmarks(b, dovecote.namespace, 0, -1, {}), "the highlight gone")
  eq("Intro.\n#hang\nTeh end.", T.text(b), "the buffer untouched")
  local call = dovecote.request_sync("command/show", { commandId = dovecote.calls()[1] })
  eq("cancelled", call.command.state, "the call cancelled")
end)

test("conflict_ask_resolved_in_a_buffer", function()
  local dovecote = require("dovecote")
  local b = T.buffer("#delay 1\nTeh plan is definately wierd, we recieve it.")
  T.correct(b, "#delay", "it.")
  T.replace(b, "wierd", "odd")
  T.replace(b, "recieve", "get")
  local conflicts = T.wait_for(function()
    local _, bufnr = next(require("dovecote.ui").conflict_buffers())
    return bufnr
  end, "the conflict buffer")
  T.settle()
  eq("The plan is definitely odd, we get it.", T.text(b), "until resolved, the person's words stay")
  eq("dovecote://conflict/" .. dovecote.calls()[1], vim.api.nvim_buf_get_name(conflicts), "named after the call")
  local lines = vim.api.nvim_buf_get_lines(conflicts, 0, -1, false)
  local text = table.concat(lines, "\n")
  local first = "── conflict 1 of 2 ──\n<<<<<<< yours\nodd\n||||||| original\nwierd\n=======\nweird\n>>>>>>> model\n"
  T.truthy(text:find(first, 1, true), "the first conflict: " .. text)
  -- Keep the model's word in the first, type another in the second.
  vim.api.nvim_set_current_buf(conflicts)
  local row = vim.fn.search("^<<<<<<< yours$")
  vim.api.nvim_win_set_cursor(0, { row + 1, 0 })
  vim.api.nvim_feedkeys("ct", "x", false)
  row = vim.fn.search("^<<<<<<< yours$")
  local last = vim.fn.search("^>>>>>>> model$")
  vim.api.nvim_buf_set_lines(conflicts, row - 1, last, false, { "obtain" })
  vim.cmd("write")
  T.wait_for(function()
    return T.text(b) == "The plan is definitely weird, we obtain it."
  end, "the resolution applied, got " .. T.text(b))
  T.wait_for(function()
    return not vim.api.nvim_buf_is_valid(conflicts)
  end, "the conflict buffer closed")
end)

test("conflict_markers", function()
  T.setup({ on_conflict = "markers" })
  local b = T.buffer("#delay 0.5\nTeh garden is wierd in winter.")
  T.correct(b, "#delay", "winter.")
  T.replace(b, "wierd", "odd")
  T.settle()
  local text = T.text(b)
  T.truthy(text:find("<<<<<<<", 1, true) and text:find("odd", 1, true) and text:find("weird", 1, true)
    and text:find(">>>>>>>", 1, true), "markers written: " .. text)
  T.truthy(text:find("^The garden"), "the rest merged: " .. text)
end)

test("server_killed_and_restarted", function()
  local dovecote = require("dovecote")
  local b = T.buffer("#delay 1\nWe beleive in teh plan.")
  T.correct(b, "#delay", "plan.")
  T.wait_for(function()
    local _, info = next(dovecote._state.flows)
    return info and info.command_state == "sent"
  end, "the call to be sent")
  local old = dovecote.server_pid()
  vim.loop.kill(old, 9)
  T.wait_for(function()
    return dovecote.status():sub(-1) == "!"
  end, "the server to be seen dead")
  -- Typed while no server runs: sent with the next document/open.
  T.edit(b, 0, 0, 0, 0, "Note: ")
  T.wait_for(function()
    return dovecote.server_pid() and dovecote.server_pid() ~= old
  end, "a new server")
  eq(1, dovecote.pending(), "still pending")
  T.settle()
  eq("Note: We believe in the plan.", T.text(b), "the buffer")
  eq("dove", dovecote.status(), "the statusline")
  local flows = dovecote.request_sync("flow/list", vim.empty_dict()).flows
  eq("completed", flows[1].state, "the flow completed")
end)

test("stalled_before_a_restart_then_replayed", function()
  local dovecote = require("dovecote")
  T.setup({ timeout = 0.3 })
  local b = T.buffer("#delay 1\nWe beleive teh plan.")
  T.correct(b, "#delay", "plan.")
  T.wait_for(function()
    local _, info = next(dovecote._state.flows)
    return info and info.command_state == "dead"
  end, "the call to die")
  local _, info = next(dovecote._state.flows)
  local dead = info.command
  local old = dovecote.server_pid()
  vim.loop.kill(old, 9)
  T.wait_for(function()
    return dovecote.server_pid() and dovecote.server_pid() ~= old
  end, "a new server")
  T.wait_for(function()
    return info.state == "stalled"
  end, "the flow seen stalled")
  eq(0, dovecote.pending(), "stalled, not pending")
  local new = dovecote.replay({ dead }, 10)
  eq({ info.command }, new, "the replay is the flow's step")
  eq(1, dovecote.pending(), "pending again")
  T.settle()
  eq("We believe the plan.", T.text(b), "the buffer")
end)

test("human_ask_answered_with_ui_input", function()
  local dovecote = require("dovecote")
  local config = T.tmp .. "/human.toml"
  vim.fn.writefile({ "[adapters.human]", 'kind = "human"' }, config)
  T.setup({ server_cmd = { T.executable, "serve", "--stdio", "--db", T.db("human"), "--config", config } })
  local asked
  vim.ui.input = function(opts, on_confirm)
    asked = opts.prompt
    on_confirm("Yes, go.")
  end
  dovecote.attach(0)
  local result = dovecote.request_sync("command/submit", {
    adapter = "human", request = { messages = { { role = "user", content = "Ship it?" } } } })
  T.wait_for(function()
    return asked
  end, "the question")
  T.truthy(asked:find("Ship it?", 1, true), "the question asked: " .. asked)
  T.wait_for(function()
    local show = dovecote.request_sync("command/show", { commandId = result.commandId })
    return show.command.state == "done" and show.command.reply.text == "Yes, go."
  end, "the answer to be the reply")
end)

test("help_tags", function()
  -- As a plugin manager does: the help tags made where the plugin is.
  local rt = T.tmp .. "/rt"
  vim.fn.mkdir(rt .. "/doc", "p")
  vim.fn.writefile(vim.fn.readfile(T.root .. "/doc/dovecote.txt"), rt .. "/doc/dovecote.txt")
  vim.cmd("helptags " .. vim.fn.fnameescape(rt .. "/doc"))
  vim.opt.runtimepath:append(rt)
  vim.cmd("help dovecote")
  eq("dovecote.txt", vim.fn.expand("%:t"), "the help file")
  for _, tag in ipairs({ "dovecote-setup", ":DovecoteCorrect", ":DovecoteCancel", ":DovecoteList",
    ":DovecoteDead", "dovecote.status()" }) do
    vim.cmd("help " .. tag)
    eq("dovecote.txt", vim.fn.expand("%:t"), "the help of " .. tag)
  end
end)
