"""Tools in the server and the web chat page: GET /v1/tools, POST /v1/tools/execute, the loop.

A tiny model is fitted in seconds to one conversation that calls the builtin `list_files` tool
and then replies with what the result lists, so that greedy decoding reproduces it. The real
server executes that call with a real `ToolBox` in a temporary working directory that holds
one file, and headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) runs the
page's loop: stream, show the call, execute it, show the result, ask again, show the answer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from test_serve import API_KEY, CPU, MODEL_NAME, ServerThread, parse_serve, tiny_model

from codeling.data import chat_data
from codeling.errors import CodelingError
from codeling.inference.engine import Engine
from codeling.serve.app import create_app
from codeling.serve.command import build_toolbox
from codeling.tools import ToolBox

CHROMIUM = Path("/usr/bin/chromium")
# Headless without the background services that would try to reach the network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"
TIMEOUT_MS = 30_000

QUESTION = "Which files are in the working directory?"
FILE_NAME = "notes.txt"
ANSWER = "There is one file: notes.txt."
CALL = {"type": "function", "function": {"name": "list_files", "arguments": {"path": "."}}}
# What ToolBox's list_files returns for a directory that holds only FILE_NAME.
LISTING = json.dumps([FILE_NAME])


# -- servers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tools-workdir")
    (directory / FILE_NAME).write_text("buy milk\n")
    return directory


@pytest.fixture(scope="module")
def toolbox(workdir) -> ToolBox:
    """The builtin tools, listing only list_files.

    The page sends every listed spec in the system turn. All seven builtin specs make the
    prompt about 1500 tokens long, which takes minutes to fit on a CPU; one keeps it near 300.
    """
    box = ToolBox(workdir)
    box.specs = [spec for spec in box.specs if spec["function"]["name"] == "list_files"]
    return box


@pytest.fixture(scope="module")
def fitted_engine(small_tokenizer, toolbox):
    """An engine whose model reproduces the list_files conversation under greedy decoding."""
    conversation = {"tools": toolbox.specs, "messages": [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": LISTING},
        {"role": "assistant", "content": ANSWER}]}

    model = tiny_model(small_tokenizer.vocab_size, max_seq_len=512).train()
    examples = chat_data.tokenize_conversations([conversation], small_tokenizer, 512, "fit")
    inputs, targets = chat_data.examples_to_batch(examples, 512, small_tokenizer.pad_id)
    trained = targets != -100

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    # One thread: with the CPU cores busy, threads spinning in OpenMP make each step of a model
    # this small about 25 times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(300):
            logits = model(inputs)
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]),
                                                     targets.view(-1))
            correct = (logits.argmax(-1)[trained] == targets[trained]).all().item()
            # Every assistant token is the argmax with a margin, so greedy decoding with the
            # cache reproduces the conversation without training to a loss near 0.
            if correct and loss.item() < 0.1:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)

    assert correct, f"the tiny model did not fit the conversation (loss {loss.item():.3f})"
    return Engine(model.eval(), small_tokenizer, CPU, max_batch_size=4)


@pytest.fixture(scope="module")
def server(fitted_engine, toolbox):
    """Tools on, with an API key; the page and most API tests use it."""
    with ServerThread(create_app(fitted_engine, MODEL_NAME, api_key=API_KEY,
                                 toolbox=toolbox)) as running:
        yield running


@pytest.fixture(scope="module")
def tools_off_server(fitted_engine, small_tokenizer):
    engine = Engine(fitted_engine.model, small_tokenizer, CPU, max_batch_size=2)
    with ServerThread(create_app(engine, MODEL_NAME)) as running:
        yield running


@pytest.fixture(scope="module")
def keyless_server(fitted_engine, small_tokenizer, tmp_path_factory):
    """Tools on with all builtin tools and no API key."""
    engine = Engine(fitted_engine.model, small_tokenizer, CPU, max_batch_size=2)
    box = ToolBox(tmp_path_factory.mktemp("keyless-workdir"))
    with ServerThread(create_app(engine, MODEL_NAME, toolbox=box)) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as opened:
        yield opened


def execute(http: httpx.Client, body, **headers) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return http.post("/v1/tools/execute", content=content,
                     headers={"Content-Type": "application/json", **headers})


# -- the API ------------------------------------------------------------------------------------


def test_tools_listed_with_workdir(http, workdir):
    response = http.get("/v1/tools")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [spec["function"]["name"] for spec in body["data"]] == ["list_files"]
    assert body["data"][0]["function"]["parameters"]["type"] == "object"
    assert body["workdir"] == str(workdir.resolve())


def test_execute_lists_workdir(http, caplog):
    with caplog.at_level(logging.INFO, logger="codeling.serve.app"):
        as_object = execute(http, {"name": "list_files", "arguments": {"path": "."}})
        as_text = execute(http, {"name": "list_files", "arguments": '{"path": "."}'})
    assert as_object.status_code == 200
    assert as_object.json() == {"content": LISTING}
    assert as_text.json() == {"content": LISTING}
    logged = [record.getMessage() for record in caplog.records
              if "tool 'list_files' ran" in record.getMessage()]
    assert len(logged) == 2
    assert logged[0].startswith(f"request {as_object.headers['x-request-id']}: ")


@pytest.mark.parametrize("path", ["/etc", "..", "../.."])
def test_execute_outside_workdir_is_tool_error(http, path):
    response = execute(http, {"name": "list_files", "arguments": {"path": path}})
    assert response.status_code == 200
    error = json.loads(response.json()["content"])["error"]
    assert "outside the working directory" in error


def test_execute_invalid_arguments_are_tool_error(http):
    response = execute(http, {"name": "list_files", "arguments": {"path": 5}})
    assert response.status_code == 200
    assert "invalid arguments for list_files" in json.loads(response.json()["content"])["error"]


@pytest.mark.parametrize("name", ["run_shell", "rm_everything"])
def test_execute_unlisted_tool_is_tool_error(http, name):
    # run_shell is a builtin tool, but this server lists only list_files.
    response = execute(http, {"name": name, "arguments": {"command": "touch ran"}})
    assert response.status_code == 200
    error = json.loads(response.json()["content"])["error"]
    assert error == f"unknown tool {name!r}; this server lists list_files"


@pytest.mark.parametrize("body, param, message", [
    ("{not json", None, "not valid JSON"),
    ("[1, 2]", None, "must be a JSON object"),
    ({"arguments": {}}, "name", "missing required parameter: 'name'"),
    ({"name": 5, "arguments": {}}, "name", "invalid value for 'name'"),
    ({"name": "list_files", "arguments": 7}, "arguments", "invalid value for 'arguments'"),
    ({"name": "list_files", "arguments": "{path"}, "arguments", "not valid JSON"),
    ({"name": "list_files", "arguments": "[1]"}, "arguments", "text of a list"),
])
def test_execute_malformed_body_400(http, body, param, message):
    response = execute(http, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_tool_routes_require_api_key(server):
    body = json.dumps({"name": "list_files", "arguments": {}})
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        listed = httpx.get(f"{server.url}/v1/tools", headers=headers)
        executed = httpx.post(f"{server.url}/v1/tools/execute", content=body,
                              headers={"Content-Type": "application/json", **headers})
        assert listed.status_code == 401
        assert executed.status_code == 401
        assert executed.json()["error"]["code"] == "invalid_api_key"


def test_tools_off_404(tools_off_server):
    listed = httpx.get(f"{tools_off_server.url}/v1/tools")
    executed = httpx.post(f"{tools_off_server.url}/v1/tools/execute",
                          json={"name": "list_files", "arguments": {}})
    assert listed.status_code == 200
    assert listed.json() == {"object": "list", "data": [], "workdir": None}
    assert executed.status_code == 404
    error = executed.json()["error"]
    assert error["code"] == "tools_disabled"
    assert "--tools builtin" in error["message"]


@pytest.mark.parametrize("headers, status, code", [
    ({"Sec-Fetch-Site": "cross-site"}, 403, "cross_origin_request"),
    ({"Sec-Fetch-Site": "same-site"}, 403, "cross_origin_request"),
    ({"Origin": "http://attacker.example"}, 403, "cross_origin_request"),
    ({"Origin": "null"}, 403, "cross_origin_request"),
    ({"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
])
def test_execute_rejects_cross_site_requests(http, headers, status, code):
    response = execute(http, {"name": "list_files", "arguments": {}}, **headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_execute_same_origin_page_allowed(http, server):
    response = execute(http, {"name": "list_files", "arguments": {}},
                       **{"Sec-Fetch-Site": "same-origin", "Origin": server.url})
    assert response.json() == {"content": LISTING}


def test_keyless_server_checks_host(keyless_server, server):
    body = {"name": "list_files", "arguments": {}}
    with httpx.Client(base_url=keyless_server.url) as client:
        rebound = client.post("/v1/tools/execute", json=body,
                              headers={"Host": f"attacker.example:{keyless_server.port}"})
        by_name = client.post("/v1/tools/execute", json=body,
                              headers={"Host": f"localhost:{keyless_server.port}"})
        by_address = client.post("/v1/tools/execute", json=body)
    assert rebound.status_code == 403
    assert rebound.json()["error"]["code"] == "host_not_allowed"
    assert by_name.status_code == 200
    assert by_address.status_code == 200
    # With an API key, any Host name may execute.
    with_key = httpx.post(f"{server.url}/v1/tools/execute", json=body,
                          headers={"Authorization": f"Bearer {API_KEY}",
                                   "Host": "codeling.example"})
    assert with_key.json() == {"content": LISTING}


def test_execution_leaves_event_loop_free(keyless_server):
    """A tool that runs for a while must not hold up other requests."""
    slow = {"name": "run_python", "arguments": {"code": "import time; time.sleep(2)"}}
    results = {}

    def run_slow() -> None:
        started = time.monotonic()
        results["response"] = httpx.post(f"{keyless_server.url}/v1/tools/execute", json=slow,
                                         timeout=60)
        results["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run_slow)
    thread.start()
    time.sleep(0.7)  # the sandbox has started the sleeping program by now
    started = time.monotonic()
    health = httpx.get(f"{keyless_server.url}/health", timeout=10)
    health_seconds = time.monotonic() - started
    thread.join(60)
    assert health.status_code == 200
    report = json.loads(results["response"].json()["content"])
    assert report["exit_code"] == 0, report
    assert results["seconds"] >= 2
    assert health_seconds < 1.0, f"/health took {health_seconds:.2f} s during a tool call"


# -- the serve command --------------------------------------------------------------------------


def test_serve_parser_tools_default_off(tmp_path):
    args = parse_serve([str(tmp_path)])
    assert args.tools == "none"
    assert args.workdir is None
    assert build_toolbox(args.tools, args.workdir) is None


def test_build_toolbox_temporary_workdir(caplog):
    with caplog.at_level(logging.INFO, logger="codeling.serve.command"):
        box = build_toolbox("builtin", None)
    assert box.workdir.is_dir()
    assert box.workdir.name.startswith("codeling-serve-")
    assert str(box.workdir) in caplog.text
    assert [spec["function"]["name"] for spec in box.specs][:2] == ["run_python", "run_shell"]
    box.workdir.rmdir()


def test_build_toolbox_given_workdir(tmp_path):
    box = build_toolbox("builtin", str(tmp_path / "new" / "dir"))
    assert box.workdir == (tmp_path / "new" / "dir").resolve()
    assert box.workdir.is_dir()
    with pytest.raises(CodelingError, match="add --tools builtin or drop --workdir"):
        build_toolbox("none", str(tmp_path))


# -- the page -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing; install Debian's chromium package with: "
                    "apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright package is not installed; "
                                   "install it with: pip install playwright")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"), executable_path=str(CHROMIUM),
            headless=True, args=CHROMIUM_ARGS, viewport={"width": 1000, "height": 900})
        yield context
        context.close()


class ChatTab:
    """A fresh tab on the chat page, with the API key entered and the tools loaded."""

    def __init__(self, browser, url: str):
        self.tab = browser.new_page()
        self.tab.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.bodies: list[tuple[str, dict]] = []  # (path, JSON body) of every POST
        self.tab.on("pageerror", lambda error: self.errors.append(str(error)))
        self.tab.on("request", self.record_request)
        self.tab.goto(url + "/")
        self.tab.fill("#api-key", API_KEY)
        # Arrow functions, because the page's CSP blocks the eval behind string predicates.
        self.tab.wait_for_function("() => codeling.chat.tools.loaded")

    def record_request(self, request) -> None:
        if request.method == "POST":
            self.bodies.append((request.url.split("/", 3)[3], json.loads(request.post_data)))

    def send(self, prompt: str, max_tokens: str = "60") -> None:
        """Type the prompt with greedy settings, press Enter, wait until the exchange ends."""
        finished = self.tab.evaluate("codeling.chat.stats.streamsFinished")
        self.tab.fill("#temperature", "0")
        self.tab.fill("#max-tokens", max_tokens)
        self.tab.fill("#prompt", prompt)
        self.tab.press("#prompt", "Enter")
        self.tab.wait_for_function(f"() => codeling.chat.stats.streamsFinished > {finished}")

    def texts(self, selector: str) -> list[str]:
        return self.tab.locator(selector).all_text_contents()

    def roles(self) -> list[str]:
        return [message["role"] for message in self.tab.evaluate("codeling.chat.messages")]


@pytest.fixture
def chat_tab(browser, server):
    opened = ChatTab(browser, server.url)
    yield opened
    opened.tab.close()


def test_page_runs_tool_and_answers(chat_tab, workdir):
    tab = chat_tab.tab
    assert tab.locator("#tools-toggle").is_visible()
    assert chat_tab.texts("#tools-note") == [f"tools on: {workdir.resolve()}"]

    chat_tab.send(QUESTION)

    assert tab.locator("#error").is_hidden(), tab.locator("#error").text_content()
    assert chat_tab.roles() == ["user", "assistant", "tool", "assistant"]
    assert chat_tab.texts(".tool-call .tool-name") == ["list_files"]
    arguments = chat_tab.texts(".tool-call .tool-arguments")[0]
    assert json.loads(arguments) == {"path": "."}
    assert "\n" in arguments  # pretty-printed
    (result,) = chat_tab.texts(".message.tool .tool-result")
    assert json.loads(result) == [FILE_NAME]
    call_id = tab.evaluate("codeling.chat.messages[1].tool_calls[0].id")
    assert chat_tab.texts(".message.tool .role") == [f"tool result for {call_id} (list_files)"]
    replies = chat_tab.texts(".message.assistant .content")
    assert replies[-1] == ANSWER
    assert tab.locator("#status").text_content() == "done (stop)"
    assert tab.evaluate("codeling.chat.stats.toolCallsExecuted") == 1

    paths = [path for path, _ in chat_tab.bodies]
    assert paths == ["v1/chat/completions", "v1/tools/execute", "v1/chat/completions"]
    first, executed, second = (body for _, body in chat_tab.bodies)
    assert [tool["function"]["name"] for tool in first["tools"]] == ["list_files"]
    assert executed == {"name": "list_files", "arguments": '{"path": "."}'}
    assert second["messages"][2] == {"role": "tool", "content": LISTING,
                                      "tool_call_id": call_id}
    assert chat_tab.errors == []

    tab.set_viewport_size({"width": 1000, "height": 760})
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=ARTIFACTS / "web-chat-tools.png")
    assert (ARTIFACTS / "web-chat-tools.png").stat().st_size > 10_000


def test_tools_toggle_off(chat_tab):
    tab = chat_tab.tab
    tab.uncheck("#tools-enabled")
    assert chat_tab.texts("#tools-note") == ["tools off"]
    chat_tab.send(QUESTION, max_tokens="8")

    paths = [path for path, _ in chat_tab.bodies]
    assert paths == ["v1/chat/completions"]
    assert "tools" not in chat_tab.bodies[0][1]
    assert chat_tab.roles()[0] == "user"
    assert "tool" not in chat_tab.roles()
    assert tab.locator(".tool-call").count() == 0


def routed_tool_calls(chat_tab: ChatTab) -> None:
    """Fulfill every chat request with a list_files call, so the model never stops calling."""
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                      "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "call_loop", "type": "function",
             "function": {"name": "list_files", "arguments": '{"path": "."}'}}]},
            "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        "[DONE]",
    ]
    body = "".join(f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"
                   for event in events)
    chat_tab.tab.route("**/v1/chat/completions",
                       lambda route: route.fulfill(status=200, body=body,
                                                   content_type="text/event-stream"))


def test_tool_rounds_limited_to_five(chat_tab):
    routed_tool_calls(chat_tab)
    chat_tab.send("keep listing")

    tab = chat_tab.tab
    paths = [path for path, _ in chat_tab.bodies]
    assert paths.count("v1/chat/completions") == 6
    assert paths.count("v1/tools/execute") == 5  # the real server ran these
    assert tab.evaluate("codeling.chat.stats.toolCallsExecuted") == 5
    assert tab.locator("#status").text_content() == "stopped after 5 rounds of tool calls"
    messages = tab.evaluate("codeling.chat.messages")
    assert [message["role"] for message in messages] == ["user"] + ["assistant", "tool"] * 6
    assert [message["content"] for message in messages[2:11:2]] == [LISTING] * 5
    assert "limit of 5 rounds" in json.loads(messages[-1]["content"])["error"]
    assert tab.locator(".message.tool.tool-error").count() == 1


def test_failed_execution_shown(chat_tab):
    routed_tool_calls(chat_tab)
    chat_tab.tab.route("**/v1/tools/execute", lambda route: route.fulfill(
        status=404, content_type="application/json",
        body=json.dumps({"error": {"message": "tools are off on this server",
                                   "type": "invalid_request_error", "param": None,
                                   "code": "tools_disabled"}})))
    chat_tab.send("list them")

    tab = chat_tab.tab
    assert "HTTP 404: tools are off on this server (tools_disabled)" in tab.locator(
        "#error").text_content()
    assert tab.locator("#status").text_content() == "failed"
    assert chat_tab.roles() == ["user", "assistant", "tool"]  # every call keeps a result
    assert chat_tab.texts(".message.tool .note") == ["failed"]
    assert tab.locator("#send").is_enabled()


def test_long_tool_result_collapsed(chat_tab):
    long_result = json.dumps([f"file_{index}.py" for index in range(40)])
    chat_tab.tab.evaluate("messages => codeling.setConversation(messages)", [
        {"role": "tool", "tool_call_id": "call_a", "content": long_result},
        {"role": "tool", "tool_call_id": "call_b", "content": LISTING}])
    details = chat_tab.tab.locator(".message.tool details.tool-result-details")
    assert details.count() == 1
    assert details.evaluate("element => element.open") is False
    assert chat_tab.texts(".tool-result-details summary") == ["result: 42 lines, 632 characters"]
    assert json.loads(chat_tab.texts(".message.tool .tool-result")[0])[39] == "file_39.py"
