-- Commands of the mlxq plugin: :MlxqRun, :MlxqRunFile, :MlxqStatus (see :help mlxq).
if vim.g.loaded_mlxq then
  return
end
vim.g.loaded_mlxq = 1

vim.cmd("runtime ftdetect/mlxq.lua")

-- Python buffers too, when require("mlxq").setup({ python = true }): the server then answers
-- only inside mlxterp names (trace.activations["..."], model.layers[i]. ...), beside your
-- own Python language server.
vim.api.nvim_create_autocmd("FileType", {
  pattern = "python",
  callback = function(args)
    local mlxq = require("mlxq")
    if mlxq.config.python then
      mlxq.attach(args.buf)
    end
  end,
})

vim.cmd([[
  highlight default link MlxqResult Comment
  highlight default link MlxqResultStale NonText
]])

vim.api.nvim_create_user_command("MlxqRun", function(opts)
  require("mlxq").run_line(opts.line1 - 1)
end, { range = true, desc = "run the .mlxq query on this line (or on line N with :N MlxqRun)" })

vim.api.nvim_create_user_command("MlxqRunFile", function()
  require("mlxq").run_file()
end, { desc = "run the whole .mlxq file" })

vim.api.nvim_create_user_command("MlxqStatus", function()
  require("mlxq").status()
end, { desc = "show the mlxterp language server's and daemon's state" })
