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
