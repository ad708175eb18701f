-- .mlxq files are mlxterp query files (filetype `mlxq`). plugin/mlxq.lua sources this too,
-- for when the plugin is added to 'runtimepath' after filetype detection was set up.
vim.cmd([[
  augroup mlxq_filetype
    autocmd!
    autocmd BufRead,BufNewFile *.mlxq setfiletype mlxq
  augroup END
]])
