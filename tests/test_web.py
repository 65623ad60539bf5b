"""The web chat page, end to end in headless Chromium driven by Playwright.

The server is the real app with a tiny random-weight model, as in test_serve.py. Its streamed
text is gibberish, so the tests check how text arrives and renders, not its content. Code
blocks, tool calls and mid-stream events that the server cannot produce yet are injected
through the page's own functions or a routed response. The tests skip where /usr/bin/chromium
or the playwright package is missing, and Playwright's own browser download is not used.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from codeling.inference.engine import Engine
from codeling.serve.app import create_app
from test_serve import API_KEY, CPU, MODEL_NAME, ServerThread, tiny_model, wait_until

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright package is not installed; "
                               "install it with: pip install playwright")

CHROMIUM = Path("/usr/bin/chromium")
# Headless without the background services that would try to reach the network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"
TIMEOUT_MS = 20_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason=f"{CHROMIUM} is missing; install Debian's chromium "
                                "package with: apt-get install -y chromium")


@pytest.fixture(scope="module")
def engine(small_tokenizer):
    return Engine(tiny_model(small_tokenizer.vocab_size), small_tokenizer, CPU,
                  max_batch_size=4, max_queue=8)


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, MODEL_NAME, api_key=API_KEY)) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"), executable_path=str(CHROMIUM),
            headless=True, args=CHROMIUM_ARGS, viewport={"width": 1000, "height": 900})
        yield context
        context.close()


class Page:
    """A fresh tab on the chat page that records requests and browser errors."""

    def __init__(self, browser, url: str):
        self.tab = browser.new_page()
        self.tab.set_default_timeout(TIMEOUT_MS)
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.tab.on("request", lambda request: self.requests.append(request.url))
        self.tab.on("pageerror", lambda error: self.errors.append(str(error)))
        self.tab.on("console", self.record_console_error)
        self.tab.goto(url + "/")
        # Arrow functions, because the page's CSP blocks the eval behind string predicates.
        self.tab.wait_for_function("() => document.getElementById('model-name').textContent"
                                   ".includes('tiny-test')")

    def record_console_error(self, message) -> None:
        if message.type == "error":
            url = message.location.get("url")
            self.errors.append(f"{message.text} ({url})" if url else message.text)

    def send(self, prompt: str, key: str = API_KEY, temperature: str = "0",
             max_tokens: str = "40") -> None:
        """Fill the settings, type the prompt, press Enter and wait until the stream ends."""
        finished = self.tab.evaluate("codeling.chat.stats.streamsFinished")
        self.tab.fill("#api-key", key)
        self.tab.fill("#temperature", temperature)
        self.tab.fill("#max-tokens", max_tokens)
        self.tab.fill("#prompt", prompt)
        self.tab.press("#prompt", "Enter")
        self.tab.wait_for_function(f"() => codeling.chat.stats.streamsFinished > {finished}")

    def texts(self, selector: str) -> list[str]:
        return self.tab.locator(selector).all_text_contents()


@pytest.fixture
def page(browser, server):
    opened = Page(browser, server.url)
    yield opened
    opened.tab.close()


def test_page_served_without_api_key(server):
    page = httpx.get(f"{server.url}/")
    script = httpx.get(f"{server.url}/static/app.js")
    api = httpx.get(f"{server.url}/v1/models")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert script.status_code == 200
    assert "chat/completions" in script.text
    assert api.status_code == 401  # the API behind the page still needs the key


def test_page_loads_only_local_files(page, server):
    assert page.requests, "the page made no requests"
    assert all(url.startswith(server.url + "/") for url in page.requests), page.requests
    # The page requests the tools on load, before the API key is entered, and Chromium logs
    # the 401 as an error.
    assert page.errors == ["Failed to load resource: the server responded with a status of 401 "
                           f"(Unauthorized) ({server.url}/v1/tools)"]
    assert page.tab.locator("#stop").is_disabled()


def test_wrong_api_key_shows_error(page):
    page.send("hello", key="wrong-key")
    error = page.tab.locator("#error")
    assert error.is_visible()
    assert "HTTP 401" in error.text_content()
    assert "incorrect API key provided" in error.text_content()
    assert "invalid_api_key" in error.text_content()
    assert page.tab.locator(".message").count() == 0  # the failed turn was taken back
    assert page.tab.input_value("#prompt") == "hello"  # ready to resend
    assert page.tab.evaluate("codeling.chat.messages") == []
    ARTIFACTS.mkdir(exist_ok=True)
    page.tab.screenshot(path=ARTIFACTS / "web-chat-error.png")


@pytest.mark.parametrize("field, value, message", [
    ("#temperature", "5", 'invalid temperature "5": enter a number from 0 to 2'),
    ("#temperature", "", 'invalid temperature "": enter a number from 0 to 2'),
    ("#max-tokens", "0", 'invalid max tokens "0": enter a whole number of at least 1'),
    ("#max-tokens", "1.5", 'invalid max tokens "1.5": enter a whole number of at least 1'),
])
def test_invalid_setting_not_sent(page, field, value, message):
    requests_before = len(page.requests)
    page.tab.fill(field, value)
    page.tab.fill("#prompt", "hello")
    page.tab.press("#prompt", "Enter")
    page.tab.locator("#error").wait_for(state="visible")
    assert page.tab.locator("#error").text_content() == message
    assert page.tab.input_value("#prompt") == "hello"  # kept for the retry
    assert len(page.requests) == requests_before  # nothing went to the server
    assert page.tab.evaluate("codeling.chat.messages") == []


def test_chat_streams_reply(page, engine):
    # Record the length of the reply's text at every DOM change while it streams in.
    page.tab.evaluate("""() => {
        window.replyLengths = [];
        new MutationObserver(() => {
            const replies = document.querySelectorAll('.message.assistant .content');
            if (replies.length) replyLengths.push(replies[replies.length - 1].textContent.length);
        }).observe(document.getElementById('messages'),
                   {childList: true, subtree: true, characterData: true});
    }""")
    page.send("Write a function that adds two numbers.", max_tokens="48")

    lengths = page.tab.evaluate("replyLengths")
    growth = sorted(set(length for length in lengths if length > 0))
    assert page.tab.locator("#error").is_hidden(), page.tab.locator("#error").text_content()
    assert len(growth) >= 3, f"the reply appeared in fewer than 3 steps: {lengths}"
    assert page.tab.evaluate("codeling.chat.stats.chunkRenders") >= 3
    reply = page.texts(".message.assistant .content")
    assert len(reply) == 1
    assert len(reply[0]) == max(growth)
    assert page.tab.locator(".message.streaming").count() == 0
    assert page.tab.locator("#status").text_content() in (
        "stopped at the max tokens limit", "done (stop)")
    assert [message["role"] for message in page.tab.evaluate("codeling.chat.messages")] == [
        "user", "assistant"]
    assert page.tab.locator("#send").is_enabled()
    assert page.tab.evaluate("sessionStorage.getItem('codeling.apiKey')") == API_KEY
    assert wait_until(lambda: engine.active_count == 0, 5)
    ARTIFACTS.mkdir(exist_ok=True)
    page.tab.screenshot(path=ARTIFACTS / "web-chat-stream.png")


def test_stop_button_aborts_stream(page, engine):
    cancelled_before = engine.stats.cancelled_sequences
    page.tab.fill("#api-key", API_KEY)
    page.tab.fill("#temperature", "0")
    page.tab.fill("#max-tokens", "1000")
    page.tab.fill("#prompt", "hi")
    page.tab.click("#send")
    page.tab.wait_for_function(
        "() => (document.querySelector('.message.assistant .content')?.textContent.length"
        " ?? 0) > 5")
    page.tab.click("#stop")
    page.tab.wait_for_function("() => codeling.chat.stats.streamsFinished === 1")

    assert page.tab.locator("#status").text_content() == "stopped"
    assert page.texts(".message.assistant .note") == ["stopped"]
    assert page.tab.locator("#error").is_hidden()
    assert wait_until(lambda: engine.stats.cancelled_sequences > cancelled_before, 10), \
        "the server did not cancel the stream that the stop button aborted"
    assert wait_until(lambda: engine.active_count == 0, 5)


def test_new_chat_during_stream(page, engine):
    page.tab.fill("#api-key", API_KEY)
    page.tab.fill("#max-tokens", "1000")
    page.tab.fill("#prompt", "hi")
    page.tab.click("#send")
    page.tab.wait_for_function(
        "() => (document.querySelector('.message.assistant .content')?.textContent.length"
        " ?? 0) > 5")
    page.tab.click("#new-chat")
    page.tab.wait_for_function("() => codeling.chat.stats.streamsFinished === 1")

    assert page.tab.locator(".message").count() == 0
    assert page.tab.evaluate("codeling.chat.messages") == []  # the old reply stayed out
    assert page.tab.locator("#send").is_enabled()
    assert wait_until(lambda: engine.active_count == 0, 10)


CODE_REPLY = """Here is the function:

```python
@cache
def add(a, b=2.5):  # sum two numbers
    \"\"\"Return a + b.\"\"\"
    return a + b + 0x1F if a is not None else print("hi")
```

Run it with `python add.py`:

```bash
# run twice
for i in 1 2; do echo "run $i" > "$HOME/out.txt"; done
```
"""


def test_code_blocks_highlighted(page):
    page.tab.evaluate("messages => codeling.setConversation(messages)",
                      [{"role": "user", "content": "add <b>two</b> numbers"},
                       {"role": "assistant", "content": CODE_REPLY}])
    python = "pre.code-block code.language-python "
    bash = "pre.code-block code.language-bash "
    assert page.tab.locator("pre.code-block").count() == 2
    assert page.texts(python + ".tok-keyword") == ["def", "return", "if", "is", "not", "None",
                                                       "else"]
    assert page.texts(python + ".tok-decorator") == ["@cache"]
    assert page.texts(python + ".tok-comment") == ["# sum two numbers"]
    assert page.texts(python + ".tok-string") == ['"""Return a + b."""', '"hi"']
    assert page.texts(python + ".tok-number") == ["2.5", "0x1F"]
    assert page.texts(python + ".tok-builtin") == ["print"]
    assert page.texts(bash + ".tok-comment") == ["# run twice"]
    assert page.texts(bash + ".tok-keyword") == ["for", "in", "do", "done"]
    assert page.texts(bash + ".tok-string") == ['"run $i"', '"$HOME/out.txt"']
    assert page.texts(bash + ".tok-number") == ["1", "2"]
    assert page.texts(".message.assistant code.inline") == ["python add.py"]
    code = page.tab.locator("code.language-python").text_content()
    assert code.startswith("@cache\ndef add(a, b=2.5):")  # highlighting keeps the text whole
    assert page.texts(".message.user .content") == ["add <b>two</b> numbers"]
    assert page.tab.locator(".message.user b").count() == 0  # text, not markup


def test_unclosed_string_highlighted_to_end(page):
    # While a reply streams, a string or a fence may not be closed yet.
    spans = page.tab.evaluate(
        "([text, language]) => {"
        "  const code = document.createElement('code');"
        "  codeling.highlightInto(code, text, language);"
        "  return [...code.children].map(span => [span.className, span.textContent]);"
        "}", ['x = """open\nstill', "py"])
    segments = page.tab.evaluate("text => codeling.splitFences(text)",
                                 "Look:\n```sh\necho $PATH")
    assert spans == [["tok-string", '"""open\nstill']]
    assert segments == [{"type": "text", "language": "", "text": "Look:"},
                        {"type": "code", "language": "sh", "text": "echo $PATH"}]


def test_untrusted_text_is_not_markup(page):
    attack = '<img src=x onerror="window.pwned=1"> ```python\n<script>window.pwned=1</script>'
    page.tab.evaluate("messages => codeling.setConversation(messages)",
                      [{"role": "assistant", "content": attack},
                       {"role": "tool", "content": "<img src=y onerror=\"window.pwned=1\">",
                        "tool_call_id": "call_x"}])
    assert page.tab.locator("#messages img, #messages script").count() == 0
    assert "<img src=x" in page.tab.locator(".message.assistant").text_content()
    assert page.tab.evaluate("window.pwned === undefined")


TOOL_CONVERSATION = [
    {"role": "user", "content": "What is 2 ** 10?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "run_python",
                                  "arguments": '{"code": "print(2 ** 10)"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "1024"},
    {"role": "assistant", "content": "It is `1024`.\n\n```python\nassert 2 ** 10 == 1024\n```"},
]


def test_tool_calls_rendered(page):
    count = page.tab.evaluate("messages => codeling.setConversation(messages)",
                              TOOL_CONVERSATION)
    assert count == 4
    assert page.texts(".tool-call .tool-name") == ["run_python"]
    assert page.texts(".tool-call .tool-call-id") == [" call_1"]
    arguments = page.texts(".tool-call .tool-arguments")[0]
    assert json.loads(arguments) == {"code": "print(2 ** 10)"}
    assert "\n" in arguments  # pretty-printed
    assert page.texts(".message.tool .role") == ["tool result for call_1"]
    assert page.texts(".message.tool .tool-result") == ["1024"]
    assert page.tab.locator(".message.tool").evaluate(
        "element => getComputedStyle(element).backgroundColor") != page.tab.locator(
        ".message.user").evaluate("element => getComputedStyle(element).backgroundColor")


def test_screenshot_of_rendered_chat(page):
    conversation = [*TOOL_CONVERSATION, {"role": "user", "content": "Now add two numbers."},
                    {"role": "assistant", "content": CODE_REPLY}]
    page.tab.set_viewport_size({"width": 1000, "height": 1250})  # tall enough for all of it
    page.tab.evaluate("messages => codeling.setConversation(messages)", conversation)
    page.tab.locator("#prompt").fill("Thanks! Now write a bash loop.")
    ARTIFACTS.mkdir(exist_ok=True)
    page.tab.screenshot(path=ARTIFACTS / "web-chat.png")
    assert (ARTIFACTS / "web-chat.png").stat().st_size > 10_000


def routed_stream(page: Page, events: list[dict | str]) -> None:
    """Fulfill the page's chat requests with these server-sent events instead of the model's."""
    body = "".join(f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"
                   for event in events)
    page.tab.route("**/v1/chat/completions",
                   lambda route: route.fulfill(status=200, body=body,
                                               content_type="text/event-stream"))


def chunk(delta: dict, finish_reason: str | None = None) -> dict:
    return {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def test_streamed_tool_call_deltas_merge(page):
    call = {"index": 0, "id": "call_7", "type": "function",
            "function": {"name": "read_file", "arguments": ""}}
    routed_stream(page, [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Let me look."}),
        chunk({"tool_calls": [call]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"path": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"a.py"}'}}]}),
        chunk({}, "tool_calls"),
        "[DONE]",
        chunk({"content": "after DONE, never shown"}),
    ])
    page.send("open a.py")
    assert page.texts(".message.assistant .content") == ["Let me look."]
    assert page.texts(".tool-call .tool-name") == ["read_file"]
    assert json.loads(page.texts(".tool-call .tool-arguments")[0]) == {"path": "a.py"}
    assert page.tab.locator("#status").text_content() == "done (tool_calls)"


def test_error_event_mid_stream_shown(page):
    routed_stream(page, [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "partial"}),
        {"error": {"message": "generation failed; see request id req_1",
                   "type": "server_error", "param": None, "code": None}},
        "[DONE]",
    ])
    page.send("x")
    assert "generation failed; see request id req_1" in page.tab.locator(
        "#error").text_content()
    assert page.texts(".message.assistant .content") == ["partial"]
    assert page.tab.locator("#status").text_content() == "failed"
