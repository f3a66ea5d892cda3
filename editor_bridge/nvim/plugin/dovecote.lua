-- dovecote.nvim's user commands.  Nothing starts until one is used (or
-- require("dovecote").setup() / .attach() is called).
if vim.g.loaded_dovecote then
  return
end
vim.g.loaded_dovecote = true

vim.api.nvim_set_hl(0, "DovecotePending", { default = true, link = "Visual" })
vim.api.nvim_set_hl(0, "DovecoteProgress", { default = true, link = "Comment" })

local function region(opts)
  local bufnr = vim.api.nvim_get_current_buf()
  if opts.range > 0 then
    local s, e = vim.api.nvim_buf_get_mark(bufnr, "<"), vim.api.nvim_buf_get_mark(bufnr, ">")
    if vim.fn.visualmode() == "v" and s[1] == opts.line1 and e[1] == opts.line2 then
      -- A characterwise selection: from its first to its last character.
      local last = vim.api.nvim_buf_get_lines(bufnr, e[1] - 1, e[1], false)[1] or ""
      local stop = math.min(#last, e[2] + vim.fn.byteidx(last:sub(e[2] + 1), 1))
      if stop <= e[2] then
        stop = #last
      end
      return s[1] - 1, s[2], e[1] - 1, stop
    end
    local last = vim.api.nvim_buf_get_lines(bufnr, opts.line2 - 1, opts.line2, false)[1] or ""
    return opts.line1 - 1, 0, opts.line2 - 1, #last
  end
  -- The paragraph under the cursor: the non-blank lines around it.
  local lines = vim.api.nvim_buf_get_lines(bufnr, 0, -1, false)
  local row = vim.api.nvim_win_get_cursor(0)[1]
  if lines[row]:match("^%s*$") then
    return nil
  end
  local first, last = row, row
  while first > 1 and not lines[first - 1]:match("^%s*$") do
    first = first - 1
  end
  while last < #lines and not lines[last + 1]:match("^%s*$") do
    last = last + 1
  end
  return first - 1, 0, last - 1, #lines[last]
end

vim.api.nvim_create_user_command("DovecoteCorrect", function(opts)
  local sr, sc, er, ec = region(opts)
  if not sr then
    vim.notify("dovecote: no paragraph under the cursor", vim.log.levels.WARN)
    return
  end
  if require("dovecote").correct(0, sr, sc, er, ec) then
    vim.notify(string.format("dovecote: correction asked (%d pending)", require("dovecote").pending()))
  end
end, { range = true, desc = "Correct the range (else the paragraph under the cursor) with the model" })

vim.api.nvim_create_user_command("DovecoteCancel", function(opts)
  local dovecote = require("dovecote")
  local bufnr = vim.api.nvim_get_current_buf()
  local ids
  if opts.bang then
    ids = dovecote.flows_at(bufnr)
  else
    local pos = vim.api.nvim_win_get_cursor(0)
    ids = dovecote.flows_at(bufnr, pos[1] - 1, pos[2])
  end
  if #ids == 0 then
    vim.notify("dovecote: no correction pending " .. (opts.bang and "in this buffer" or "under the cursor"),
      vim.log.levels.WARN)
    return
  end
  dovecote.cancel(ids)
end, { bang = true, desc = "Cancel the correction under the cursor (! every one of the buffer)" })

vim.api.nvim_create_user_command("DovecoteList", function()
  require("dovecote.ui").list()
end, { desc = "List this Neovim's calls" })

vim.api.nvim_create_user_command("DovecoteDead", function()
  require("dovecote.ui").dead()
end, { desc = "List the dead letters, to replay them" })
