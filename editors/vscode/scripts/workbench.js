// Drives a VS Code workbench (code-server) in Debian's Chromium through playwright-core, for
// tests/test_vscode_workbench.py: one JSON request a line on stdin, one JSON answer a line on
// stdout ({ok: true, value} or {ok: false, error}). The test decides what to do and what is
// right; this script only acts on the page and reports what it shows.
//
//   node workbench.js PLAYWRIGHT_CORE_DIR
//
// Requests (op and its fields):
//   open {url}                    start Chromium, load the workbench, wait for it
//   press {keys: [...]}           keyboard presses, e.g. "Control+P", "Enter"
//   type {text}                   type text where the focus is
//   command {title}               run a Command Palette command by its title
//   quickOpen {name}              open a workspace file by name (Ctrl+P)
//   goto {line, column}           move the cursor (1-based), via Go to Line
//   texts {selector, contains, timeout}
//                                 innerText and aria-label of every element matching the CSS
//                                 selector, once one contains `contains` (or, without it, once
//                                 one exists), or whatever is there when `timeout` ms pass
//   lineAtCursor {contains, timeout}
//                                 the text the active editor shows on the cursor's line (inline
//                                 results included), once it contains `contains` or at timeout
//   console                       every console message of the page so far: [{type, text}]
//   click {selector, contains}    click the first element matching that contains the text
//   setSetting {id, value}        set a string setting in the Settings editor
//   hoverAt {line, column}        put the cursor there and show the hover
//   screenshot {path}
//   close
"use strict";

const readline = require("readline");

const { chromium } = require(process.argv[2]);

let browser = null;
let page = null;
const consoleMessages = []; // the page's console (the extension host's errors show there)

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function elements(selector) {
  return page.$$eval(selector, (nodes) =>
    nodes.map((n) => ({
      text: (n.innerText || n.textContent || "").replace(/\u00a0/g, " "), // editors draw spaces as nbsp
      aria: n.getAttribute("aria-label") || "",
    })));
}

async function texts({ selector, contains, timeout = 10000 }) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const found = await elements(selector);
    const hit = contains === undefined || contains === null
      ? found.length > 0
      : found.some((e) => e.text.includes(contains) || e.aria.includes(contains));
    if (hit || Date.now() > deadline) return found;
    await sleep(100);
  }
}

async function quickInput(prefixKeys, text) {
  await page.keyboard.press(prefixKeys);
  const box = page.locator(".quick-input-widget .quick-input-box input");
  await box.waitFor({ state: "visible", timeout: 10000 });
  await page.keyboard.type(text);
}

async function command({ title }) {
  await quickInput("F1", title);
  // wait for the row of exactly this command, then run it
  const row = page.locator(".quick-input-list .monaco-list-row", { hasText: title }).first();
  await row.waitFor({ state: "visible", timeout: 10000 });
  await page.keyboard.press("Enter");
  await page.locator(".quick-input-widget").waitFor({ state: "hidden", timeout: 10000 });
}

async function quickOpen({ name }) {
  await quickInput("Control+P", name);
  const row = page.locator(".quick-input-list .monaco-list-row", { hasText: name }).first();
  await row.waitFor({ state: "visible", timeout: 15000 });
  await page.keyboard.press("Enter");
  await page.locator(`.tab[aria-label^="${name}"]`).first().waitFor({ timeout: 15000 });
  await page.locator(".monaco-editor textarea").first().waitFor({ timeout: 10000 });
}

async function goto({ line, column }) {
  await quickInput("Control+G", `${line}:${column}`);
  await page.keyboard.press("Enter");
  await page.locator(".quick-input-widget").waitFor({ state: "hidden", timeout: 10000 });
}

const ops = {
  async open({ url }) {
    browser = await chromium.launch({
      executablePath: "/usr/bin/chromium",
      headless: true,
      args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
    });
    page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    page.on("console", (m) => consoleMessages.push({ type: m.type(), text: m.text() }));
    page.on("pageerror", (err) => consoleMessages.push({ type: "pageerror", text: String(err) }));
    await page.goto(url, { waitUntil: "domcontentloaded", timeout: 60000 });
    await page.locator(".monaco-workbench").waitFor({ timeout: 60000 });
    await page.locator(".explorer-folders-view, .welcome-view, .editor-group-container").first()
      .waitFor({ timeout: 60000 });
    return true;
  },
  async press({ keys }) {
    for (const key of keys) await page.keyboard.press(key);
    return true;
  },
  async type({ text }) {
    await page.keyboard.type(text, { delay: 20 });
    return true;
  },
  async command(request) {
    await command(request);
    return true;
  },
  async quickOpen(request) {
    await quickOpen(request);
    return true;
  },
  async goto(request) {
    await goto(request);
    return true;
  },
  texts,
  async console() {
    return consoleMessages;
  },
  async lineAtCursor({ contains, timeout = 10000 }) {
    // the active editor's current-line overlay and its view line share their `top`
    const deadline = Date.now() + timeout;
    for (;;) {
      const text = await page.evaluate(() => {
        const editor = document.querySelector(".editor-group-container.active .monaco-editor");
        const current = editor && editor.querySelector(".view-overlays .current-line");
        if (!current) return null;
        const top = current.parentElement.style.top;
        const line = [...editor.querySelectorAll(".view-lines .view-line")].find((l) => l.style.top === top);
        return line ? line.textContent.replace(/\u00a0/g, " ") : null;
      });
      if (text !== null && (!contains || text.includes(contains))) return text;
      if (Date.now() > deadline) return text === null ? "" : text;
      await sleep(100);
    }
  },
  async click({ selector, contains }) {
    const target = page.locator(selector, contains ? { hasText: contains } : {}).first();
    await target.click({ timeout: 10000 });
    return true;
  },
  async setSetting({ id, value }) {
    // through the Settings editor, as a user would; closes it afterwards
    await command({ title: "Preferences: Open User Settings" });
    await page.locator(".settings-editor .settings-body").waitFor({ timeout: 15000 });
    await sleep(300);
    await page.keyboard.type(id); // the search box has the focus
    const input = page.locator(".settings-editor .settings-body .setting-item-contents input").first();
    await page.locator(".settings-editor .setting-item-contents", { hasText: "Path of the" }).first()
      .waitFor({ timeout: 15000 });
    await input.fill(value); // at once: typing races the editor's re-render after each write
    await sleep(1000); // the editor writes the setting after a short debounce
    await page.keyboard.press("Escape");
    await page.keyboard.press("Escape");
    return true;
  },
  async hoverAt({ line, column }) {
    await goto({ line, column });
    await command({ title: "Show or Focus Hover" });
    return true;
  },
  async screenshot({ path }) {
    if (page) await page.screenshot({ path, fullPage: true });
    return path;
  },
  async close() {
    if (browser) await browser.close();
    browser = null;
    return true;
  },
};

async function main() {
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    let answer;
    try {
      const request = JSON.parse(line);
      const op = ops[request.op];
      if (!op) throw new Error(`unknown op ${request.op}; known: ${Object.keys(ops).join(", ")}`);
      answer = { ok: true, value: await op(request) };
    } catch (err) {
      answer = { ok: false, error: String((err && err.stack) || err) };
    }
    process.stdout.write(JSON.stringify(answer) + "\n");
  }
  if (browser) await browser.close();
}

main();
