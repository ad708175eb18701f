-- Buffer settings for .mlxq files, and starting the language server for them.
if vim.b.did_ftplugin then
  return
end
vim.b.did_ftplugin = 1

vim.bo.commentstring = "# %s"
vim.bo.comments = ":#"
vim.b.undo_ftplugin = "setlocal commentstring< comments<"

require("mlxq").attach(vim.api.nvim_get_current_buf())
