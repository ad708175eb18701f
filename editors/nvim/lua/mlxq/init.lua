-- The mlxq plugin: starts `mlxterp lsp` for .mlxq buffers, runs queries through the
-- server's `mlxterp.run` command and draws each result as end-of-line virtual text.
--
-- Neovim before 0.10 has no inlay hints, so results arrive by the server's own
-- notification `mlxterp/results` ({uri, version, results = {{line, text, stale, full}}})
-- and are drawn as extmarks; they move with the text, and a result whose line is edited
-- is dimmed at once (the server then confirms it as stale). Works on Neovim 0.7
-- (`vim.lsp.start_client`) and later (`vim.lsp.start`). See :help mlxq.
local M = {}

local RUN_COMMAND = "mlxterp.run"
local INFO_COMMAND = "mlxterp.serverInfo"
local RESULTS_NOTIFICATION = "mlxterp/results"
local STALE_MARK = "(stale) "

M.config = {
  cmd = { "mlxterp", "lsp" }, -- the language server command
  status_cmd = { "mlxterp", "status" }, -- also shown by :MlxqStatus when it can be run
  model = "demo", -- model the daemon loads when the server starts it
  socket = nil, -- the daemon's socket (default: mlxterp's default place)
  runtime_dir = nil, -- the daemon's runtime directory
  autostart = true, -- start the daemon when none runs
  prefix = "  => ", -- put before each inline result
  codelens = false, -- show the server's "Run" code lenses (as virtual text, next to results)
  python = false, -- also attach to Python buffers: completion, hover and checks of mlxterp names in them
}

M.ns = vim.api.nvim_create_namespace("mlxq_results")
M.client_id = nil
M.results = {} -- bufnr -> the last results the server sent
M.attached = {} -- bufnr -> true once on_lines is watched

function M.setup(opts)
  M.config = vim.tbl_deep_extend("force", M.config, opts or {})
end

local function notify(message, level)
  vim.notify("mlxq: " .. message, level or vim.log.levels.INFO)
end

-- --- inline results -------------------------------------------------------------

-- Draw every result of `bufnr` at the end of its line: plain when fresh, dimmed when stale.
function M.draw(bufnr)
  if not vim.api.nvim_buf_is_valid(bufnr) then
    return
  end
  vim.api.nvim_buf_clear_namespace(bufnr, M.ns, 0, -1)
  local n_lines = vim.api.nvim_buf_line_count(bufnr)
  for _, result in ipairs(M.results[bufnr] or {}) do
    if result.line >= 0 and result.line < n_lines then
      local group = result.stale and "MlxqResultStale" or "MlxqResult"
      vim.api.nvim_buf_set_extmark(bufnr, M.ns, result.line, 0, {
        virt_text = { { M.config.prefix .. result.text, group } },
        virt_text_pos = "eol",
        hl_mode = "combine",
      })
    end
  end
end

-- The results drawn on `bufnr` now: {{line, text, group}} (0-based lines), in line order.
function M.shown(bufnr)
  local shown = {}
  for _, mark in ipairs(vim.api.nvim_buf_get_extmarks(bufnr, M.ns, 0, -1, { details = true })) do
    local chunk = mark[4].virt_text[1]
    table.insert(shown, { line = mark[2], text = chunk[1]:sub(#M.config.prefix + 1), group = chunk[2] })
  end
  return shown
end

local function on_results(_, params)
  if type(params) ~= "table" or type(params.uri) ~= "string" then
    return
  end
  local bufnr = vim.uri_to_bufnr(params.uri)
  M.results[bufnr] = params.results or {}
  M.draw(bufnr)
end

-- An edited line's result is dimmed at once, before the server says it is stale. Extmarks
-- already follow lines inserted or deleted above them.
local function dim_edited(bufnr, first, last_new)
  for _, mark in ipairs(vim.api.nvim_buf_get_extmarks(bufnr, M.ns, { first, 0 }, { math.max(first, last_new), -1 },
    { details = true })) do
    local id, row, details = mark[1], mark[2], mark[4]
    local chunk = details.virt_text and details.virt_text[1]
    if chunk and chunk[2] ~= "MlxqResultStale" then
      local text = chunk[1]:sub(#M.config.prefix + 1)
      vim.api.nvim_buf_set_extmark(bufnr, M.ns, row, 0, {
        id = id,
        virt_text = { { M.config.prefix .. STALE_MARK .. text, "MlxqResultStale" } },
        virt_text_pos = "eol",
        hl_mode = "combine",
      })
    end
  end
end

local function watch(bufnr)
  if M.attached[bufnr] then
    return
  end
  M.attached[bufnr] = true
  vim.api.nvim_buf_attach(bufnr, false, {
    on_lines = function(_, buf, _, first, _, last_new)
      vim.schedule(function()
        if vim.api.nvim_buf_is_valid(buf) then
          dim_edited(buf, first, last_new)
        end
      end)
    end,
    on_detach = function(_, buf)
      M.attached[buf] = nil
      M.results[buf] = nil
    end,
  })
end

-- --- the language server ----------------------------------------------------------

local function server_config(bufnr)
  local c = M.config
  local env = {}
  if c.runtime_dir then
    env.MLXTERP_RUNTIME_DIR = c.runtime_dir
  end
  if c.socket then
    env.MLXTERP_SOCKET = c.socket
  end
  local name = vim.api.nvim_buf_get_name(bufnr)
  return {
    name = "mlxq",
    cmd = c.cmd,
    cmd_env = env,
    root_dir = name ~= "" and vim.fn.fnamemodify(name, ":p:h") or vim.fn.getcwd(),
    init_options = {
      model = c.model,
      socket = c.socket,
      runtimeDir = c.runtime_dir,
      autostart = c.autostart,
    },
    handlers = { [RESULTS_NOTIFICATION] = on_results },
    on_attach = function(client, buf)
      vim.bo[buf].omnifunc = "v:lua.vim.lsp.omnifunc"
      if M.config.codelens and client.server_capabilities.codeLensProvider then
        pcall(vim.lsp.codelens.refresh)
        vim.api.nvim_create_autocmd({ "BufEnter", "InsertLeave", "BufWritePost" }, {
          buffer = buf,
          callback = function()
            pcall(vim.lsp.codelens.refresh)
          end,
        })
      end
    end,
    on_exit = function(code)
      if code ~= 0 then
        vim.schedule(function()
          notify(("the language server exited with code %d; see :LspLog"):format(code), vim.log.levels.WARN)
        end)
      end
    end,
  }
end

local function live(id)
  return id ~= nil and vim.lsp.get_client_by_id(id) ~= nil
end

-- Start the server (once) and attach it to `bufnr`.
function M.attach(bufnr)
  if vim.fn.executable(M.config.cmd[1]) ~= 1 then
    notify(("`%s` is not an executable on PATH; set cmd in require('mlxq').setup{}"):format(M.config.cmd[1]),
      vim.log.levels.ERROR)
    return nil
  end
  local config = server_config(bufnr)
  if vim.lsp.start then -- Neovim 0.8 and later: reuses a client of the same name and root
    if live(M.client_id) then
      vim.lsp.buf_attach_client(bufnr, M.client_id)
    else
      M.client_id = vim.lsp.start(config, { bufnr = bufnr })
    end
  else -- Neovim 0.7
    if not live(M.client_id) then
      M.client_id = vim.lsp.start_client(config)
    end
    if M.client_id then
      vim.lsp.buf_attach_client(bufnr, M.client_id)
    end
  end
  watch(bufnr)
  return M.client_id
end

function M.client()
  if live(M.client_id) then
    return vim.lsp.get_client_by_id(M.client_id)
  end
  return nil
end

local function execute(command, arguments, bufnr, on_done)
  local client = M.client()
  if not client then
    notify("the language server is not running (open a .mlxq file, or see :LspLog)", vim.log.levels.WARN)
    return false
  end
  return client.request("workspace/executeCommand", { command = command, arguments = arguments },
    function(err, result)
      if err then
        notify(err.message or tostring(err), vim.log.levels.ERROR)
      elseif on_done then
        on_done(result)
      end
    end, bufnr)
end

local function report(result)
  if type(result) == "table" and result.ok == false and result.status ~= "interrupted" then
    local where = type(result.line) == "number" and ("line %d: "):format(result.line + 1) or ""
    notify(where .. (result.error or result.status or "the query failed"), vim.log.levels.WARN)
  end
end

-- Run the query on 0-based `line` of the current buffer (with the prompt above it).
function M.run_line(line)
  local bufnr = vim.api.nvim_get_current_buf()
  return execute(RUN_COMMAND, { vim.uri_from_bufnr(bufnr), line }, bufnr, report)
end

function M.run_file()
  local bufnr = vim.api.nvim_get_current_buf()
  return execute(RUN_COMMAND, { vim.uri_from_bufnr(bufnr) }, bufnr, report)
end

-- :MlxqStatus: what the server holds (daemon connected, pid, modules, last error), and the
-- output of `mlxterp status` when that command can be run. Returns the lines it shows.
function M.status(on_done)
  local lines = {}
  local function finish()
    if vim.fn.executable(M.config.status_cmd[1]) == 1 then
      local env_prefix = {}
      if M.config.runtime_dir then
        table.insert(env_prefix, "MLXTERP_RUNTIME_DIR=" .. vim.fn.shellescape(M.config.runtime_dir))
      end
      if M.config.socket then
        table.insert(env_prefix, "MLXTERP_SOCKET=" .. vim.fn.shellescape(M.config.socket))
      end
      local command = table.concat(vim.tbl_map(vim.fn.shellescape, M.config.status_cmd), " ")
      if #env_prefix > 0 then
        command = "env " .. table.concat(env_prefix, " ") .. " " .. command
      end
      for _, line in ipairs(vim.split(vim.fn.system(command), "\n", { trimempty = true })) do
        table.insert(lines, line)
      end
    end
    M.last_status = lines
    vim.notify(table.concat(lines, "\n"))
    if on_done then
      on_done(lines)
    end
  end
  local client = M.client()
  if not client then
    table.insert(lines, "language server: not running")
    finish()
    return
  end
  client.request("workspace/executeCommand", { command = INFO_COMMAND, arguments = {} }, function(err, info)
    if err or type(info) ~= "table" then
      table.insert(lines, "language server: running, no answer (" .. (err and err.message or "?") .. ")")
    else
      local daemon = "daemon not connected"
      if info.daemon_connected then
        daemon = ("daemon pid %s, connected"):format(tostring(info.daemon_pid))
      end
      table.insert(lines, ("language server: mlxterp-lsp %s, %s"):format(tostring(info.version), daemon))
      if info.last_error and info.last_error ~= vim.NIL then
        table.insert(lines, "last error: " .. tostring(info.last_error))
      end
    end
    finish()
  end)
end

return M
