// Tokenise .mlxq files with the extension's TextMate grammar, as VS Code would, and print
// JSON: {file: [[{text, scopes}, ...] per line]}. Used by tests/test_editors_vscode.py.
// Usage: node scripts/tokenize.js FILE...
"use strict";

const fs = require("fs");
const path = require("path");
const oniguruma = require("vscode-oniguruma");
const vsctm = require("vscode-textmate");

const GRAMMAR = path.join(__dirname, "..", "syntaxes", "mlxq.tmLanguage.json");
const WASM = path.join(path.dirname(require.resolve("vscode-oniguruma")), "onig.wasm");

async function main(files) {
  const wasm = fs.readFileSync(WASM).buffer;
  await oniguruma.loadWASM(wasm);
  const registry = new vsctm.Registry({
    onigLib: Promise.resolve({
      createOnigScanner: (patterns) => new oniguruma.OnigScanner(patterns),
      createOnigString: (text) => new oniguruma.OnigString(text),
    }),
    loadGrammar: async (scopeName) => {
      if (scopeName !== "source.mlxq") return null;
      return vsctm.parseRawGrammar(fs.readFileSync(GRAMMAR, "utf8"), GRAMMAR);
    },
  });
  const grammar = await registry.loadGrammar("source.mlxq");
  const out = {};
  for (const file of files) {
    const lines = fs.readFileSync(file, "utf8").split(/\r?\n/);
    let state = vsctm.INITIAL;
    out[file] = lines.map((line) => {
      const result = grammar.tokenizeLine(line, state);
      state = result.ruleStack;
      return result.tokens.map((t) => ({ text: line.slice(t.startIndex, t.endIndex), scopes: t.scopes }));
    });
  }
  process.stdout.write(JSON.stringify(out));
}

main(process.argv.slice(2)).catch((err) => {
  process.stderr.write(`tokenize.js: ${err.stack || err}\n`);
  process.exit(1);
});
