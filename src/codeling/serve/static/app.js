// The codeling web chat: sends the conversation to /v1/chat/completions with stream: true and
// renders the server-sent chunks as they arrive. When the server lists tools (GET /v1/tools),
// the page offers them to the model, executes the calls it writes through
// POST /v1/tools/execute and requests another reply with the results. Untrusted text only ever
// reaches the page through textContent and text nodes, never through innerHTML.
"use strict";

const API_KEY_STORAGE = "codeling.apiKey";
// Rounds of tool calls executed at most for one user message, as in `codeling chat`.
const MAX_TOOL_ROUNDS = 5;
// A tool result longer than this is collapsed behind a summary line.
const RESULT_COLLAPSE_LINES = 12;
const RESULT_COLLAPSE_CHARS = 800;

// -- syntax highlighting --------------------------------------------------------------------

const PYTHON_KEYWORDS = new Set(("False None True and as assert async await break class " +
  "continue def del elif else except finally for from global if import in is lambda " +
  "nonlocal not or pass raise return try while with yield match case").split(" "));
const PYTHON_BUILTINS = new Set(("abs all any bool bytes callable chr dict dir divmod " +
  "enumerate filter float format frozenset getattr hasattr hash id input int isinstance " +
  "issubclass iter len list map max min next object open ord pow print property range repr " +
  "reversed round set setattr slice sorted str sum super tuple type vars zip self cls " +
  "Exception ValueError TypeError KeyError IndexError RuntimeError").split(" "));
const BASH_KEYWORDS = new Set(("if then else elif fi for while until do done case esac in " +
  "function select return exit local export readonly declare unset shift break continue " +
  "time").split(" "));
const BASH_BUILTINS = new Set(("echo printf cd pwd read source test set trap eval exec " +
  "alias type command cat grep sed awk ls mkdir rm cp mv pip python git curl").split(" "));

// Each rule is one named group of a single regular expression. The first alternative that
// matches wins, so comments and strings come before numbers and words. An unterminated string
// runs to the end of the text, as it does while a reply is still streaming.
const PYTHON_STRING = [
  String.raw`"""[\s\S]*?(?:"""|$)`,  // without the m flag, $ is the end of the text
  String.raw`'''[\s\S]*?(?:'''|$)`,
  String.raw`"(?:[^"\\\n]|\\[\s\S])*"?`,
  String.raw`'(?:[^'\\\n]|\\[\s\S])*'?`,
].join("|");
const PYTHON_NUMBER = [
  String.raw`\b0[xXoObB][\da-fA-F_]+\b`,
  String.raw`(?:\b\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?[jJ]?`,
].join("|");

const HIGHLIGHT_RULES = {
  python: {
    pattern: new RegExp([
      String.raw`(?<comment>#[^\n]*)`,
      String.raw`(?<string>(?:[rRbBuUfF]{1,2})?(?:${PYTHON_STRING}))`,
      String.raw`(?<decorator>@[A-Za-z_][\w.]*)`,
      String.raw`(?<number>${PYTHON_NUMBER})`,
      String.raw`(?<word>[A-Za-z_]\w*)`,
    ].join("|"), "g"),
    keywords: PYTHON_KEYWORDS,
    builtins: PYTHON_BUILTINS,
  },
  bash: {
    pattern: new RegExp([
      // A # starts a comment only at the start of a word, as in `echo a#b` versus `# note`.
      String.raw`(?<comment>(?<![^\s;|&()])#[^\n]*)`,
      String.raw`(?<string>'[^']*'?|"(?:[^"\\]|\\[\s\S])*"?)`,
      String.raw`(?<variable>\$(?:\{[^}\n]*\}?|[A-Za-z_]\w*|[0-9@#?$!*-]))`,
      String.raw`(?<number>\b\d+\b)`,
      String.raw`(?<word>[A-Za-z_][\w-]*)`,
    ].join("|"), "g"),
    keywords: BASH_KEYWORDS,
    builtins: BASH_BUILTINS,
  },
};

const LANGUAGE_ALIASES = {
  python: "python", py: "python", python3: "python", py3: "python",
  bash: "bash", sh: "bash", shell: "bash", zsh: "bash", console: "bash", shellsession: "bash",
};

function tokenClass(rules, groups) {
  for (const [name, value] of Object.entries(groups)) {
    if (value === undefined) continue;
    if (name !== "word") return "tok-" + name;
    if (rules.keywords.has(value)) return "tok-keyword";
    if (rules.builtins.has(value)) return "tok-builtin";
    return null;
  }
  return null;
}

// Fill `codeElement` with the code as text nodes and <span class="tok-..."> elements.
function highlightInto(codeElement, code, language) {
  const rules = HIGHLIGHT_RULES[LANGUAGE_ALIASES[language]];
  if (!rules) {
    codeElement.textContent = code;
    return;
  }
  const pattern = new RegExp(rules.pattern.source, "g");
  let plainStart = 0;
  let match;
  while ((match = pattern.exec(code)) !== null) {
    if (match[0] === "") {
      pattern.lastIndex += 1;  // an empty match would loop forever
      continue;
    }
    const className = tokenClass(rules, match.groups);
    if (className === null) continue;  // a plain word stays in the surrounding text
    if (match.index > plainStart) {
      codeElement.append(code.slice(plainStart, match.index));
    }
    const span = document.createElement("span");
    span.className = className;
    span.textContent = match[0];
    codeElement.append(span);
    plainStart = match.index + match[0].length;
  }
  if (plainStart < code.length) codeElement.append(code.slice(plainStart));
}

// -- message rendering ------------------------------------------------------------------------

// Split markdown-style text into text and ``` fenced code segments. An unclosed fence runs to
// the end, so a code block shows while the model is still writing it.
function splitFences(text) {
  const segments = [];
  let current = {type: "text", language: "", lines: []};
  for (const line of text.split("\n")) {
    const fence = /^\s*```\s*([\w+#.-]*)\s*$/.exec(line);
    if (fence === null) {
      current.lines.push(line);
      continue;
    }
    segments.push(current);
    current = current.type === "text"
      ? {type: "code", language: fence[1].toLowerCase(), lines: []}
      : {type: "text", language: "", lines: []};
  }
  segments.push(current);
  return segments
    .map((segment) => ({type: segment.type, language: segment.language,
      text: segment.lines.join("\n")}))
    .filter((segment) => segment.type === "code" || segment.text.trim() !== "");
}

// Append text with `inline code` spans as <code> elements.
function appendInlineText(parent, text) {
  const paragraph = document.createElement("div");
  paragraph.className = "text";
  const parts = text.replace(/^\n+|\n+$/g, "").split(/(`[^`\n]+`)/);
  for (const part of parts) {
    if (part.length > 2 && part.startsWith("`") && part.endsWith("`")) {
      const code = document.createElement("code");
      code.className = "inline";
      code.textContent = part.slice(1, -1);
      paragraph.append(code);
    } else if (part) {
      paragraph.append(part);
    }
  }
  parent.append(paragraph);
}

function renderCodeBlock(segment) {
  const pre = document.createElement("pre");
  pre.className = "code-block";
  const code = document.createElement("code");
  if (segment.language) {
    code.className = "language-" + segment.language;
    pre.dataset.language = segment.language;
  }
  highlightInto(code, segment.text, segment.language);
  pre.append(code);
  return pre;
}

// Render OpenAI content: a string, or a list of parts of which only text parts are shown.
function contentText(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    return content.filter((part) => part && part.type === "text").map((part) => part.text)
      .join("");
  }
  return "";
}

function formatArguments(argumentsText) {
  try {
    return JSON.stringify(JSON.parse(argumentsText), null, 2);
  } catch (error) {
    return argumentsText;  // still streaming or not JSON, so it is shown as sent
  }
}

function renderToolCalls(toolCalls) {
  const list = document.createElement("div");
  list.className = "tool-calls";
  for (const call of toolCalls) {
    const fn = call.function || {};
    const box = document.createElement("div");
    box.className = "tool-call";
    const title = document.createElement("div");
    title.className = "tool-call-title";
    title.textContent = "tool call: ";
    const name = document.createElement("span");
    name.className = "tool-name";
    name.textContent = fn.name || "(unnamed)";
    title.append(name);
    if (call.id) {
      const id = document.createElement("span");
      id.className = "tool-call-id";
      id.textContent = " " + call.id;
      title.append(id);
    }
    const args = document.createElement("pre");
    args.className = "tool-arguments";
    args.textContent = formatArguments(fn.arguments || "");
    box.append(title, args);
    list.append(box);
  }
  return list;
}

// Return the error message of a tool result {"error": MESSAGE}, or null for other results.
function toolErrorOf(text) {
  try {
    const parsed = JSON.parse(text);
    if (parsed && typeof parsed === "object" && typeof parsed.error === "string" &&
        Object.keys(parsed).length === 1) {
      return parsed.error;
    }
  } catch (error) {
    // Not JSON (read_file returns the file text), so not an error result.
  }
  return null;
}

// Render a tool result, pretty-printed when it is JSON, behind a <details> when it is long.
function renderToolResult(text) {
  const pre = document.createElement("pre");
  pre.className = "tool-result";
  pre.textContent = formatArguments(text);
  const formatted = pre.textContent;
  const lines = formatted.split("\n").length;
  if (lines <= RESULT_COLLAPSE_LINES && formatted.length <= RESULT_COLLAPSE_CHARS) return pre;
  const details = document.createElement("details");
  details.className = "tool-result-details";
  const summary = document.createElement("summary");
  summary.textContent = `result: ${lines} lines, ${formatted.length} characters`;
  details.append(summary, pre);
  return details;
}

// Fill the role label. A tool result names its call id and tool in a span of their own,
// because the label's style turns text to upper case and ids are case-sensitive.
function fillRoleLabel(label, message) {
  if (message.role !== "tool") {
    label.textContent = message.role;
    return;
  }
  label.textContent = "tool result";
  let detail = "";
  if (message.tool_call_id) detail += " for " + message.tool_call_id;
  if (message.toolName) detail += " (" + message.toolName + ")";
  if (detail) {
    const span = document.createElement("span");
    span.className = "role-detail";
    span.textContent = detail;
    label.append(span);
  }
}

function fillMessage(element, message) {
  element.replaceChildren();
  element.className = "message " + message.role;
  element.dataset.role = message.role;

  const label = document.createElement("div");
  label.className = "role";
  fillRoleLabel(label, message);
  element.append(label);

  const body = document.createElement("div");
  body.className = "content";
  const text = contentText(message.content);
  if (message.role === "assistant") {
    for (const segment of splitFences(text)) {
      if (segment.type === "code") body.append(renderCodeBlock(segment));
      else appendInlineText(body, segment.text);
    }
  } else if (message.role === "tool") {
    if (text || !message.note) body.append(renderToolResult(text));
    if (toolErrorOf(text) !== null) element.classList.add("tool-error");
  } else {
    appendInlineText(body, text);
  }
  element.append(body);

  if (Array.isArray(message.tool_calls) && message.tool_calls.length > 0) {
    element.append(renderToolCalls(message.tool_calls));
  }
  if (message.note) {
    const note = document.createElement("div");
    note.className = "note";
    note.textContent = message.note;
    element.append(note);
  }
}

// -- page state -------------------------------------------------------------------------------

const chat = {
  messages: [],        // the conversation sent to the server, in OpenAI's message shape
  controller: null,    // the AbortController of the exchange in progress
  model: null,
  // What GET /v1/tools returned. `loaded` stays false until a request succeeds, because a
  // server with an API key returns 401 until the key is entered.
  tools: {specs: [], workdir: null, loaded: false},
  stats: {chunkRenders: 0, streamsFinished: 0, toolCallsExecuted: 0},
};

const $ = (id) => document.getElementById(id);

function renderConversation(messages) {
  const list = $("messages");
  list.replaceChildren();
  for (const message of messages) {
    const element = document.createElement("div");
    fillMessage(element, message);
    list.append(element);
  }
  list.scrollTop = list.scrollHeight;
  return list.children.length;
}

// Replace the conversation, for "New chat" and for tests that inject messages.
function setConversation(messages) {
  chat.messages = messages.map((message) => ({...message}));
  hideError();
  return renderConversation(chat.messages);
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setStatus(text) {
  $("status").textContent = text;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.classList.toggle("busy", busy);
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? {Authorization: "Bearer " + key} : {};
}

// Turn a failed response into a message, from OpenAI's error body where the server sent one.
async function describeFailure(response) {
  let detail = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error) {
      detail = body.error.message || detail;
      if (body.error.code) detail += " (" + body.error.code + ")";
    }
  } catch (error) {
    // The body is not JSON, so the status line is all there is.
  }
  return "HTTP " + response.status + ": " + detail;
}

// Yield the data of each server-sent event in a fetch response body. Events end with a blank
// line; an event with several data: lines carries them joined by newlines.
async function* readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let dataLines = [];
  try {
    while (true) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).replace(/\r$/, "");
        buffer = buffer.slice(newline + 1);
        if (line === "") {
          if (dataLines.length > 0) yield dataLines.join("\n");
          dataLines = [];
        } else if (line.startsWith("data:")) {
          dataLines.push(line.slice(5).replace(/^ /, ""));
        }
        // other fields (event:, id:, retry:) and comments are not used by this API
      }
    }
    if (dataLines.length > 0) yield dataLines.join("\n");
  } finally {
    // Closing the body early (after [DONE] or an error event) closes the connection, so the
    // server cancels the generation. Cancelling a finished or aborted body only rejects.
    reader.cancel().catch(() => {});
  }
}

// Merge one streamed delta into the assistant message. Tool call pieces with the same index
// join into one call.
function applyDelta(message, delta) {
  if (typeof delta.content === "string") message.content += delta.content;
  if (Array.isArray(delta.tool_calls)) {
    message.tool_calls = message.tool_calls || [];
    for (const piece of delta.tool_calls) {
      const index = piece.index ?? message.tool_calls.length;
      if (!message.tool_calls[index]) {
        message.tool_calls[index] = {id: "", type: "function",
          function: {name: "", arguments: ""}};
      }
      const call = message.tool_calls[index];
      if (piece.id) call.id = piece.id;
      if (piece.function && piece.function.name) call.function.name += piece.function.name;
      if (piece.function && piece.function.arguments) {
        call.function.arguments += piece.function.arguments;
      }
    }
  }
}

// Read a number input; an empty field or a value that fails `isValid` raises an Error.
function readNumber(id, label, isValid, expected) {
  const raw = $(id).value.trim();
  const value = Number(raw);
  if (raw === "" || !isValid(value)) {
    throw new Error(`invalid ${label} "${raw}": enter ${expected}`);
  }
  return value;
}

function readSettings() {
  return {
    temperature: readNumber("temperature", "temperature",
      (value) => Number.isFinite(value) && value >= 0 && value <= 2, "a number from 0 to 2"),
    max_tokens: readNumber("max-tokens", "max tokens",
      (value) => Number.isInteger(value) && value >= 1, "a whole number of at least 1"),
  };
}

// The fields of a message that go to the server; display-only fields such as `note` stay here.
function requestMessage({role, content, tool_calls, tool_call_id, name}) {
  return {role, content, tool_calls, tool_call_id, name};
}

function finishStatus(finishReason) {
  if (finishReason === "length") return "stopped at the max tokens limit";
  return finishReason ? "done (" + finishReason + ")" : "done";
}

function scrollToEnd() {
  $("messages").scrollTop = $("messages").scrollHeight;
}

// Stream one assistant turn into a new message element and return {reply, element,
// finishReason}. Whatever part of the reply arrived joins the conversation, even when the
// stream then fails or is stopped.
async function streamReply(conversation, settings, tools, controller) {
  const request = {
    model: chat.model || "default",
    messages: conversation.map(requestMessage),
    stream: true,
    ...settings,
  };
  if (tools) request.tools = tools;

  const reply = {role: "assistant", content: ""};
  const element = document.createElement("div");
  fillMessage(element, reply);
  element.classList.add("streaming");
  $("messages").append(element);
  scrollToEnd();
  let finishReason = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: {"Content-Type": "application/json", ...authHeaders()},
      body: JSON.stringify(request),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await describeFailure(response));

    for await (const data of readEvents(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        // The server reports a failure after the stream started as an error event.
        throw new Error(chunk.error.message || "the server reported an error");
      }
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      applyDelta(reply, choice.delta || {});
      if (choice.finish_reason) finishReason = choice.finish_reason;
      fillMessage(element, reply);
      element.classList.add("streaming");
      chat.stats.chunkRenders += 1;
      scrollToEnd();
    }
    return {reply, element, finishReason};
  } catch (error) {
    if (controller.signal.aborted) reply.note = "stopped";
    throw error;
  } finally {
    if (reply.content || reply.tool_calls) conversation.push(reply);
    fillMessage(element, reply);
  }
}

// Execute one tool call on the server; return the result text.
async function executeTool(call, signal) {
  const fn = call.function || {};
  const response = await fetch("v1/tools/execute", {
    method: "POST",
    headers: {"Content-Type": "application/json", ...authHeaders()},
    body: JSON.stringify({name: fn.name, arguments: fn.arguments || "{}"}),
    signal,
  });
  if (!response.ok) throw new Error(await describeFailure(response));
  const body = await response.json();
  if (typeof body.content !== "string") {
    throw new Error("the server's tool result has no content string");
  }
  return body.content;
}

// Add a tool message for each call, as the chat format expects one result per call.
function appendToolMessage(conversation, call, content, note) {
  const message = {role: "tool", tool_call_id: call.id || undefined, content,
    toolName: (call.function || {}).name};
  if (note) message.note = note;
  conversation.push(message);
  const element = document.createElement("div");
  fillMessage(element, message);
  $("messages").append(element);
  scrollToEnd();
  return {message, element};
}

// Execute the calls of one reply in order and add their results to the conversation. When a
// call fails or is stopped, it and the calls after it get error results, so that every call
// still has its result, and the error is raised.
async function executeToolCalls(conversation, calls, controller) {
  for (let index = 0; index < calls.length; index += 1) {
    const call = calls[index];
    setStatus("running " + ((call.function || {}).name || "a tool") + "…");
    const {message, element} = appendToolMessage(conversation, call, "", "running…");
    element.classList.add("running");
    try {
      message.content = await executeTool(call, controller.signal);
      delete message.note;
      chat.stats.toolCallsExecuted += 1;
    } catch (error) {
      const reason = controller.signal.aborted ? "stopped before it finished"
        : "the page failed to execute it: " + error.message;
      message.content = JSON.stringify({error: "not executed: " + reason});
      message.note = controller.signal.aborted ? "stopped" : "failed";
      for (const later of calls.slice(index + 1)) {
        appendToolMessage(conversation, later,
          JSON.stringify({error: "not executed because an earlier tool call failed"}),
          "not executed");
      }
      throw error;
    } finally {
      fillMessage(element, message);
    }
  }
}

// The tool specs to send, or null when the server has none or the toggle is off.
function activeTools() {
  return chat.tools.specs.length > 0 && $("tools-enabled").checked ? chat.tools.specs : null;
}

// Send a user message and run the exchange: stream the reply, execute its tool calls and ask
// again with their results, until a reply has no calls or MAX_TOOL_ROUNDS rounds have run.
async function send(prompt) {
  hideError();
  let settings;
  try {
    settings = readSettings();
  } catch (error) {
    showError(error.message);
    $("prompt").value = prompt;
    return;
  }
  // "New chat" during the exchange replaces chat.messages; this exchange stays with its own.
  const conversation = chat.messages;
  conversation.push({role: "user", content: prompt});
  const userIndex = conversation.length - 1;
  renderConversation(conversation);

  const controller = new AbortController();
  chat.controller = controller;
  setBusy(true);
  try {
    if (!chat.tools.loaded) await loadTools();
    let status = "done";
    for (let round = 0; ; round += 1) {
      const tools = activeTools();
      setStatus(round === 0 ? "generating…" : `generating… (after tool round ${round})`);
      const {reply, element, finishReason} =
        await streamReply(conversation, settings, tools, controller);
      const calls = reply.tool_calls || [];
      status = finishStatus(finishReason);
      if (finishReason !== "tool_calls" || calls.length === 0) break;
      if (!tools) {
        // Only a server that was sent no tools can get here, through a proxy or a test.
        reply.note = "tool calls not executed: tools are off";
        fillMessage(element, reply);
        break;
      }
      if (round >= MAX_TOOL_ROUNDS) {
        for (const call of calls) {
          appendToolMessage(conversation, call, JSON.stringify({error: "not executed: the " +
            `limit of ${MAX_TOOL_ROUNDS} rounds of tool calls in one answer was reached`}),
          "not executed");
        }
        status = `stopped after ${MAX_TOOL_ROUNDS} rounds of tool calls`;
        break;
      }
      await executeToolCalls(conversation, calls, controller);
      if (conversation !== chat.messages) return;
    }
    setStatus(status);
  } catch (error) {
    if (controller.signal.aborted) {
      if (conversation === chat.messages) setStatus("stopped");
    } else {
      showError(error.message);
      setStatus("failed");
      if (conversation.length === userIndex + 1 && conversation === chat.messages) {
        // Nothing came back and the error box shows why, so the prompt goes back for a retry.
        conversation.pop();
        renderConversation(conversation);
        if (!$("prompt").value) $("prompt").value = prompt;
      }
    }
  } finally {
    if (chat.controller === controller) chat.controller = null;
    setBusy(chat.controller !== null);
    chat.stats.streamsFinished += 1;
  }
}

function stop() {
  if (chat.controller) chat.controller.abort();
}

// Read the served model's name from /health, which needs no API key.
async function loadModel() {
  try {
    const response = await fetch("health");
    const body = await response.json();
    if (body.model) {
      chat.model = body.model;
      $("model-name").textContent = "model: " + body.model;
    }
    if (!response.ok) $("model-name").textContent += " (" + (body.status || "unavailable") + ")";
  } catch (error) {
    $("model-name").textContent = "model: unknown (health check failed)";
  }
}

// Ask the server which tools it executes (GET /v1/tools, a codeling extension).
async function loadTools() {
  let response;
  try {
    response = await fetch("v1/tools", {headers: authHeaders()});
  } catch (error) {
    return;  // the server is unreachable; the next chat request reports that
  }
  if (response.status === 401) {
    // Retried when the API key changes and before the next message.
    chat.tools = {specs: [], workdir: null, loaded: false};
  } else if (!response.ok) {
    // A server without the route (404) executes no tools.
    chat.tools = {specs: [], workdir: null, loaded: true};
  } else {
    const body = await response.json();
    chat.tools = {specs: Array.isArray(body.data) ? body.data : [],
      workdir: body.workdir || null, loaded: true};
  }
  renderToolsToggle();
}

function renderToolsToggle() {
  const {specs, workdir} = chat.tools;
  $("tools-toggle").hidden = specs.length === 0;
  const names = specs.map((spec) => (spec.function || {}).name).join(", ");
  $("tools-toggle").title = "tools: " + names + "\nworking directory: " + workdir +
    "\nThe tools run on the server machine, in its sandbox.";
  $("tools-note").textContent = $("tools-enabled").checked
    ? "tools on: " + (workdir || "(no working directory)") : "tools off";
}

function start() {
  const keyInput = $("api-key");
  keyInput.value = sessionStorage.getItem(API_KEY_STORAGE) || "";
  let keyTimer = null;
  keyInput.addEventListener("input", () => {
    sessionStorage.setItem(API_KEY_STORAGE, keyInput.value);
    clearTimeout(keyTimer);
    keyTimer = setTimeout(loadTools, 300);
  });
  $("tools-enabled").addEventListener("change", renderToolsToggle);

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const prompt = $("prompt").value;
    if (!prompt.trim() || chat.controller) return;
    $("prompt").value = "";
    send(prompt);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => {
    stop();
    setConversation([]);
    setStatus("");
  });
  loadModel();
  loadTools();
}

// The page's functions, for the browser console and the end-to-end tests.
window.codeling = {chat, renderConversation, setConversation, highlightInto, splitFences, send,
  stop, loadTools};

document.addEventListener("DOMContentLoaded", start);
