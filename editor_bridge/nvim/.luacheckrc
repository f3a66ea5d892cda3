-- luacheck settings for dovecote.nvim (make lint runs luacheck here).
std = "luajit"
read_globals = { "vim" }
globals = { "dovecote_test" }
max_line_length = 120
