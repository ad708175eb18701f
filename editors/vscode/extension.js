// The VS Code side of mlxterp: starts `mlxterp lsp` (stdio) for .mlxq files and adds the
// commands Run line, Run file, Restart server and Show daemon status. Everything else
// (diagnostics, completion, hover, code lens, inlay-hint results, semantic tokens) comes
// from the language server; see docs/editors.md.
"use strict";

const vscode = require("vscode");
const { execFile } = require("child_process");
const { LanguageClient, TransportKind } = require("vscode-languageclient/node");

const RUN_COMMAND = "mlxterp.run"; // the server's command: [uri] runs the file, [uri, line] one line

let client = null;
let output = null;

function settings() {
  const config = vscode.workspace.getConfiguration("mlxq");
  return {
    command: config.get("command") || "mlxterp",
    model: config.get("model") || "demo",
    socket: config.get("daemonSocket") || "",
    runtimeDir: config.get("runtimeDir") || "",
    autostart: config.get("autostart", true),
    pythonFiles: config.get("pythonFiles", false),
  };
}

// The daemon settings also go into the environment, so `mlxterp status` and a daemon
// started by the server agree on where the socket is.
function daemonEnv(s) {
  const env = Object.assign({}, process.env);
  if (s.runtimeDir) env.MLXTERP_RUNTIME_DIR = s.runtimeDir;
  if (s.socket) env.MLXTERP_SOCKET = s.socket;
  return env;
}

function initializationOptions(s) {
  const options = { model: s.model, autostart: s.autostart };
  if (s.socket) options.socket = s.socket;
  if (s.runtimeDir) options.runtimeDir = s.runtimeDir;
  return options;
}

function createClient() {
  const s = settings();
  const run = {
    command: s.command,
    args: ["lsp"], // the client appends --stdio for TransportKind.stdio
    transport: TransportKind.stdio,
    options: { env: daemonEnv(s) },
  };
  return new LanguageClient(
    "mlxq",
    "mlxterp language server",
    { run: run, debug: run },
    {
      documentSelector: [{ language: "mlxq" }].concat(s.pythonFiles ? [
        { language: "python", scheme: "file" },
        { language: "python", scheme: "vscode-notebook-cell" }, // cells of Jupyter notebooks
      ] : []),
      middleware: {
        // The server has no colours for Python: VS Code then uses the Python extension's.
        provideDocumentSemanticTokens: (document, token, next) =>
          document.languageId === "python" ? undefined : next(document, token),
      },
      initializationOptions: initializationOptions(s),
      outputChannel: output,
    }
  );
}

// The client rejects with a string when the process could not be spawned, with an Error
// when the server started but the connection or `initialize` failed.
function startFailure(err, command) {
  const cause = (err && err.message) || String(err);
  if (/\b(ENOENT|EACCES)\b|Launching server using command/.test(cause)) {
    return `mlxterp: could not run \`${command} lsp\` (${cause}). ` +
      "Set mlxq.command to the mlxterp in your environment, e.g. /path/to/.venv/bin/mlxterp.";
  }
  return `mlxterp: the language server \`${command} lsp\` started but failed: ${cause}`;
}

async function startClient() {
  client = createClient();
  try {
    await client.start();
  } catch (err) {
    const message = startFailure(err, settings().command);
    output.error(message);
    const choice = await vscode.window.showErrorMessage(message, "Show log");
    if (choice === "Show log") output.show(true);
  }
}

async function runQuery(wholeFile) {
  const editor = vscode.window.activeTextEditor;
  if (!editor || editor.document.languageId !== "mlxq") {
    vscode.window.showWarningMessage("mlxterp: open a .mlxq file to run it.");
    return;
  }
  if (!client || !client.isRunning()) {
    vscode.window.showWarningMessage("mlxterp: the language server is not running (mlxq: Restart language server).");
    return;
  }
  const uri = editor.document.uri.toString();
  const args = wholeFile ? [uri] : [uri, editor.selection.active.line];
  const outcome = await client.sendRequest("workspace/executeCommand", { command: RUN_COMMAND, arguments: args });
  if (outcome && outcome.ok === false && outcome.status !== "interrupted") {
    vscode.window.showWarningMessage(`mlxterp: ${outcome.error || outcome.status || "the query failed"}`);
  }
}

async function restartServer() {
  if (client && client.needsStop()) { // not one that failed to start
    try {
      await client.stop();
    } catch (err) {
      output.warn(`stopping the server: ${err.message || err}`);
    }
  }
  await startClient();
}

function showStatus() {
  const s = settings();
  execFile(s.command, ["status"], { env: daemonEnv(s), timeout: 10000 }, (err, stdout, stderr) => {
    output.appendLine(`$ ${s.command} status`);
    output.append(stdout || "");
    output.append(stderr || "");
    if (err && !stdout) output.appendLine(`(${err.message})`);
    output.show(true);
  });
}

async function activate(context) {
  // A log channel: vscode-languageclient 11 calls its error/trace/onDidChangeLogLevel.
  output = vscode.window.createOutputChannel("mlxq", { log: true });
  context.subscriptions.push(
    output,
    vscode.commands.registerCommand("mlxq.runLine", () => runQuery(false)),
    vscode.commands.registerCommand("mlxq.runFile", () => runQuery(true)),
    vscode.commands.registerCommand("mlxq.restartServer", restartServer),
    vscode.commands.registerCommand("mlxq.showStatus", showStatus),
    vscode.workspace.onDidChangeConfiguration((event) => {
      if (event.affectsConfiguration("mlxq.command") || event.affectsConfiguration("mlxq.model") ||
          event.affectsConfiguration("mlxq.daemonSocket") || event.affectsConfiguration("mlxq.runtimeDir") ||
          event.affectsConfiguration("mlxq.autostart") || event.affectsConfiguration("mlxq.pythonFiles")) {
        restartServer();
      }
    })
  );
  const mlxqOpen = () => vscode.workspace.textDocuments.some((document) => document.languageId === "mlxq");
  if (!settings().pythonFiles && !mlxqOpen()) {
    // Activated by a Python file while mlxq.pythonFiles is off: wait for a .mlxq file.
    const waiting = vscode.workspace.onDidOpenTextDocument((document) => {
      if (document.languageId === "mlxq" && !client) {
        waiting.dispose();
        startClient();
      }
    });
    context.subscriptions.push(waiting);
    return;
  }
  await startClient();
}

async function deactivate() {
  if (client) await client.stop();
}

module.exports = { activate, deactivate };
