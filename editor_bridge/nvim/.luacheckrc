-- luacheck settings for dovecote.nvim (make lint runs luacheck here).
std = "luajit"
globals = { "vim", "dovecote_test" }
max_line_length = 120
