"""The `codeling serve` command: load a checkpoint and serve it over HTTP with uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from codeling.errors import CodelingError

if TYPE_CHECKING:  # importing the tools imports jsonschema, which `codeling --help` does not need
    from codeling.tools import ToolBox

log = logging.getLogger(__name__)

API_KEY_ENV = "CODELING_API_KEY"


def add_serve_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare `codeling serve` and its options on the `codeling` subcommands."""
    parser = commands.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Load a checkpoint and serve /v1/chat/completions, /v1/completions, "
        "/v1/models and /health, and a web chat page at /. Requests are decoded together in "
        "batches. With --tools builtin, clients and the chat page can also execute tool calls "
        "on this machine through /v1/tools/execute. Needs the fastapi and uvicorn packages.")
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                        help="run directory, stage directory or checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 exposes the server to the network "
                        "(default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000,
                        help="TCP port to listen on (default: 8000)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes; the "
                        f"{API_KEY_ENV} environment variable sets it too, without showing it "
                        "in the process list (default: no key)")
    parser.add_argument("--model-name", default=None,
                        help="model id that clients send and /v1/models lists (default: the "
                        "name of the RUN_OR_CHECKPOINT directory)")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="sequences decoded together at most, in sequences; each choice of "
                        "a request with n > 1 counts as one (default: 16)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="sequences that may wait for a free batch slot; more requests get "
                        "status 503 (default: 256)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N "
                        "(default: auto)")
    parser.add_argument("--tools", default="none", metavar="TOOLS",
                        help="tools that GET /v1/tools lists and POST /v1/tools/execute runs, "
                        "for the web chat page and API clients: builtin (run_python, "
                        "run_shell, read_file, list_files, search_code, write_file and "
                        "git_status, run on this machine in the sandbox and confined to "
                        "--workdir), a comma-separated list of some of them, or none "
                        "(default: none)")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="working directory of the tools, created if missing; needs --tools "
                        "builtin (default: a new temporary directory, logged at start and kept)")
    return parser


def build_toolbox(tools: str, workdir: str | None) -> ToolBox | None:
    """Build the ToolBox that --tools and --workdir select; return None when tools are off.

    Without `workdir`, the tools get a new temporary directory, which is kept after the server
    stops so that what the tools wrote can be inspected.
    """
    from codeling.tools import ToolBox, parse_tools_option, working_directory

    names = parse_tools_option(tools)
    if names is None:
        if workdir is not None:
            raise CodelingError("--workdir sets the working directory of the tools, which are "
                                "off; add --tools builtin or drop --workdir")
        return None

    path, new = working_directory(workdir, "codeling-serve-")
    log.info("tools on: working directory %s%s", path,
             " (a new temporary directory, kept after the server stops)" if new else "")
    return ToolBox(path, names=names)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args: argparse.Namespace) -> int:
    """Load the checkpoint named in `args`, serve it until interrupted; return the exit status."""
    try:
        import uvicorn

        from codeling.serve.app import create_app
    except ImportError as error:
        raise CodelingError(f"codeling serve needs fastapi and uvicorn ({error}); install them "
                            "with: pip install fastapi uvicorn") from None
    from codeling.inference.engine import Engine

    if not 1 <= args.port <= 65535:
        raise CodelingError(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch_size < 1:
        raise CodelingError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    if args.max_queue < 0:
        raise CodelingError(f"--max-queue must be 0 or more, got {args.max_queue}")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    model_name = args.model_name or Path(args.checkpoint).resolve().name
    from codeling.tools import parse_tools_option

    # A bad --tools value, or --workdir without tools, fails before the model loads.
    if parse_tools_option(args.tools) is None and args.workdir is not None:
        build_toolbox(args.tools, args.workdir)  # raises: --workdir without tools
    engine = Engine.from_checkpoint(args.checkpoint, device=args.device,
                                    max_batch_size=args.max_batch_size,
                                    max_queue=args.max_queue)
    # After the checkpoint loaded, so a bad checkpoint leaves no new directory behind.
    toolbox = build_toolbox(args.tools, args.workdir)
    if toolbox is not None and api_key is None and not _is_loopback(args.host):
        log.warning("tools are on, --host %s accepts connections from the network and no API "
                    "key is set: anyone who reaches port %d can run code on this machine; set "
                    "--api-key or %s", args.host, args.port, API_KEY_ENV)
    app = create_app(engine, model_name, api_key=api_key, toolbox=toolbox)
    log.info("serving %s as model %r on http://%s:%d (API key %s)", args.checkpoint, model_name,
             args.host, args.port, "required" if api_key else "not required")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.stop()
    return 0
