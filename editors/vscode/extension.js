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
    args: ["lsp", "--stdio"],
    transport: TransportKind.stdio,
    options: { env: daemonEnv(s) },
  };
  return new LanguageClient(
    "mlxq",
    "mlxterp language server",
    { run: run, debug: run },
    {
      documentSelector: [{ language: "mlxq" }],
      initializationOptions: initializationOptions(s),
      outputChannel: output,
    }
  );
}

async function startClient() {
  client = createClient();
  try {
    await client.start();
  } catch (err) {
    const s = settings();
    vscode.window.showErrorMessage(
      `mlxterp: could not start \`${s.command} lsp\` (${err.message || err}). ` +
        "Set mlxq.command to the mlxterp in your environment, e.g. /path/to/.venv/bin/mlxterp."
    );
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
  if (client) {
    try {
      await client.stop();
    } catch (err) {
      output.appendLine(`stopping the server: ${err.message || err}`);
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
  output = vscode.window.createOutputChannel("mlxq");
  context.subscriptions.push(
    output,
    vscode.commands.registerCommand("mlxq.runLine", () => runQuery(false)),
    vscode.commands.registerCommand("mlxq.runFile", () => runQuery(true)),
    vscode.commands.registerCommand("mlxq.restartServer", restartServer),
    vscode.commands.registerCommand("mlxq.showStatus", showStatus),
    vscode.workspace.onDidChangeConfiguration((event) => {
      if (event.affectsConfiguration("mlxq.command") || event.affectsConfiguration("mlxq.model") ||
          event.affectsConfiguration("mlxq.daemonSocket") || event.affectsConfiguration("mlxq.runtimeDir") ||
          event.affectsConfiguration("mlxq.autostart")) {
        restartServer();
      }
    })
  );
  await startClient();
}

async function deactivate() {
  if (client) await client.stop();
}

module.exports = { activate, deactivate };
