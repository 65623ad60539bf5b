// The codeling web chat: sends the conversation to /v1/chat/completions with stream: true and
// renders the server-sent chunks as they arrive. Untrusted text only ever reaches the page
// through textContent and text nodes, never through innerHTML.
"use strict";

const API_KEY_STORAGE = "codeling.apiKey";

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

function fillMessage(element, message) {
  element.replaceChildren();
  element.className = "message " + message.role;
  element.dataset.role = message.role;

  const label = document.createElement("div");
  label.className = "role";
  label.textContent = message.role === "tool"
    ? "tool result" + (message.tool_call_id ? " for " + message.tool_call_id : "")
    : message.role;
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
    const pre = document.createElement("pre");
    pre.className = "tool-result";
    pre.textContent = formatArguments(text);
    body.append(pre);
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
  controller: null,    // the AbortController of the stream in progress
  model: null,
  stats: {chunkRenders: 0, streamsFinished: 0},
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
  // "New chat" during the stream replaces chat.messages; this reply stays with its own chat.
  const conversation = chat.messages;
  conversation.push({role: "user", content: prompt});
  const request = {
    model: chat.model || "default",
    messages: conversation.map(({role, content, tool_calls, tool_call_id, name}) =>
      ({role, content, tool_calls, tool_call_id, name})),
    stream: true,
    ...settings,
  };
  renderConversation(chat.messages);

  const reply = {role: "assistant", content: ""};
  const element = document.createElement("div");
  fillMessage(element, reply);
  element.classList.add("streaming");
  $("messages").append(element);

  const controller = new AbortController();
  chat.controller = controller;
  setBusy(true);
  setStatus("generating…");
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
      $("messages").scrollTop = $("messages").scrollHeight;
    }
    if (finishReason === "length") setStatus("stopped at the max tokens limit");
    else setStatus(finishReason ? "done (" + finishReason + ")" : "done");
  } catch (error) {
    if (controller.signal.aborted) {
      reply.note = "stopped";
      if (conversation === chat.messages) setStatus("stopped");
    } else {
      showError(error.message);
      setStatus("failed");
    }
  } finally {
    chat.controller = null;
    setBusy(false);
    const current = conversation === chat.messages;
    if (reply.content || reply.tool_calls) {
      conversation.push(reply);
      fillMessage(element, reply);
    } else if (!controller.signal.aborted && current) {
      // Nothing came back and the error box shows why, so the prompt goes back for a retry.
      conversation.pop();
      renderConversation(conversation);
      if (!$("prompt").value) $("prompt").value = prompt;
    } else {
      fillMessage(element, reply);
    }
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

function start() {
  const keyInput = $("api-key");
  keyInput.value = sessionStorage.getItem(API_KEY_STORAGE) || "";
  keyInput.addEventListener("input", () => {
    sessionStorage.setItem(API_KEY_STORAGE, keyInput.value);
  });

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
}

// The page's functions, for the browser console and the end-to-end tests.
window.codeling = {chat, renderConversation, setConversation, highlightInto, splitFences, send,
  stop};

document.addEventListener("DOMContentLoaded", start);
