-- Drives Neovim (headless) with the mlxq plugin on one .mlxq file and one Python file against
-- a running daemon, for tests/test_editors_nvim.py. Reads MLXQ_PLUGIN, MLXQ_FILE, MLXQ_PY_FILE, MLXQ_CMD,
-- MLXQ_STATUS_CMD (JSON lists), MLXQ_RUNTIME_DIR; writes what it saw as JSON to MLXQ_OUT.
--   nvim --headless --clean -u NONE -c "luafile tests/nvim_driver.lua"
local out = { steps = {} }
local TIMEOUT = 20000

local function step(name)
  table.insert(out.steps, name)
end

local function wait_for(what, condition, timeout)
  if not vim.wait(timeout or TIMEOUT, condition, 20) then
    error("timed out waiting for " .. what)
  end
end

local function main()
  local env = vim.env
  vim.opt.runtimepath:prepend(env.MLXQ_PLUGIN)
  vim.cmd("filetype plugin on")
  vim.cmd("runtime! plugin/mlxq.lua")
  local mlxq = require("mlxq")
  mlxq.setup({
    cmd = vim.fn.json_decode(env.MLXQ_CMD),
    status_cmd = vim.fn.json_decode(env.MLXQ_STATUS_CMD),
    runtime_dir = env.MLXQ_RUNTIME_DIR,
    autostart = false,
    python = true,
  })

  vim.cmd("edit " .. vim.fn.fnameescape(env.MLXQ_FILE))
  local buf = vim.api.nvim_get_current_buf()
  out.filetype = vim.bo[buf].filetype
  step("opened")
  wait_for("the language server to attach", function()
    return mlxq.client() ~= nil and mlxq.client().initialized ~= false and vim.lsp.buf_is_attached(buf, mlxq.client_id)
  end)

  -- diagnostics: the misspelt module is reported once the server has the module tree
  wait_for("a diagnostic naming the misspelt module", function()
    for _, d in ipairs(vim.diagnostic.get(buf)) do
      if d.message:find("mlpp", 1, true) then
        return true
      end
    end
    return false
  end)
  out.diagnostics = {}
  for _, d in ipairs(vim.diagnostic.get(buf)) do
    table.insert(out.diagnostics, { line = d.lnum, col = d.col, message = d.message, source = d.source })
  end
  out.omnifunc = vim.bo[buf].omnifunc -- set by on_attach, after the server initialized
  step("diagnostics")

  -- completion after `layers.8.` (line 2), through the client's own request
  local line = vim.api.nvim_buf_get_lines(buf, 2, 3, false)[1]
  local params = { textDocument = { uri = vim.uri_from_bufnr(buf) }, position = { line = 2, character = #line } }
  local answers = vim.lsp.buf_request_sync(buf, "textDocument/completion", params, TIMEOUT)
  out.completion = {}
  for _, answer in pairs(answers or {}) do
    local items = answer.result and (answer.result.items or answer.result) or {}
    for _, item in ipairs(items) do
      table.insert(out.completion, item.label)
    end
  end
  step("completion")

  -- run line 4 (0-based 3) and read its virtual text
  vim.cmd("4MlxqRun")
  wait_for("the result's virtual text", function()
    for _, shown in ipairs(mlxq.shown(buf)) do
      if shown.line == 3 then
        return true
      end
    end
    return false
  end)
  out.after_run = mlxq.shown(buf)
  step("run")

  -- a line inserted above: the result moves down with its line and stays fresh
  vim.api.nvim_buf_set_lines(buf, 0, 0, false, { "# a new first line" })
  vim.wait(600, function() return false end, 20) -- the server's own update arrives meanwhile
  out.after_insert = mlxq.shown(buf)
  step("insert")

  -- its own line edited: dimmed, marked stale
  vim.api.nvim_buf_set_lines(buf, 4, 5, false, { "save layers.8 @ -2" })
  wait_for("the result to be dimmed", function()
    for _, shown in ipairs(mlxq.shown(buf)) do
      if shown.line == 4 and shown.group == "MlxqResultStale" then
        return true
      end
    end
    return false
  end)
  vim.wait(600, function() return false end, 20)
  out.after_edit = mlxq.shown(buf)
  step("edit")

  -- the whole file, once its errors are fixed: a fresh result on every statement
  vim.api.nvim_buf_set_lines(buf, 0, -1, false,
    { 'prompt "The capital of France is"', "save layers.8.mlp @ -1", "# a comment", "save layers.2 @ 0" })
  vim.cmd("MlxqRunFile")
  wait_for("the file's results", function()
    local fresh = 0
    for _, shown in ipairs(mlxq.shown(buf)) do
      if shown.group == "MlxqResult" then
        fresh = fresh + 1
      end
    end
    return fresh == 3
  end)
  out.after_run_file = mlxq.shown(buf)
  step("run file")

  -- hover on the module of line 2: the module, then the line's whole result
  local hover = vim.lsp.buf_request_sync(buf, "textDocument/hover",
    { textDocument = { uri = vim.uri_from_bufnr(buf) }, position = { line = 1, character = 8 } }, TIMEOUT)
  out.hover = ""
  for _, answer in pairs(hover or {}) do
    if answer.result then
      out.hover = out.hover .. answer.result.contents.value
    end
  end
  step("hover")

  -- the whole file with an error on its third line: the message names that line
  local notes = {}
  local notify = vim.notify
  vim.notify = function(message, level)
    table.insert(notes, message)
    return notify(message, level)
  end
  vim.api.nvim_buf_set_lines(buf, 0, -1, false,
    { 'prompt "The capital of France is"', "save layers.8 @ -1", 'save layers.8 @ "Germany"' })
  vim.cmd("MlxqRunFile")
  wait_for("the run's error message", function()
    for _, note in ipairs(notes) do
      if note:find("Germany", 1, true) then
        return true
      end
    end
    return false
  end)
  vim.notify = notify
  out.run_file_notes = notes
  step("run file error")

  -- a Python buffer: the same server attaches; checks and completion inside mlxterp names
  vim.cmd("edit " .. vim.fn.fnameescape(env.MLXQ_PY_FILE))
  local py = vim.api.nvim_get_current_buf()
  out.py_filetype = vim.bo[py].filetype
  wait_for("the language server to attach to the Python buffer", function()
    return vim.lsp.buf_is_attached(py, mlxq.client_id)
  end)
  wait_for("a diagnostic in the Python buffer", function()
    return #vim.diagnostic.get(py) > 0
  end)
  out.py_diagnostics = {}
  for _, d in ipairs(vim.diagnostic.get(py)) do
    table.insert(out.py_diagnostics, { line = d.lnum, col = d.col, end_col = d.end_col, message = d.message })
  end
  local py_line = vim.api.nvim_buf_get_lines(py, 2, 3, false)[1]
  local py_answers = vim.lsp.buf_request_sync(py, "textDocument/completion",
    { textDocument = { uri = vim.uri_from_bufnr(py) }, position = { line = 2, character = #py_line } }, TIMEOUT)
  out.py_completion = {}
  for _, answer in pairs(py_answers or {}) do
    local items = answer.result and (answer.result.items or answer.result) or {}
    for _, item in ipairs(items) do
      table.insert(out.py_completion, item.label)
    end
  end
  step("python")

  local status
  mlxq.status(function(lines) status = lines end)
  wait_for(":MlxqStatus", function() return status ~= nil end)
  out.status = status
  step("status")
end

local ok, err = xpcall(main, debug.traceback)
if not ok then
  out.error = err
end
local file = io.open(vim.env.MLXQ_OUT, "w")
file:write(vim.fn.json_encode(out))
file:close()
vim.cmd("qa!")
