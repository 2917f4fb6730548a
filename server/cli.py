"""``trainserve serve MODEL``: the OpenAI-compatible server as a standalone process."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

logger = logging.getLogger("trainserve.server")
_LEVELS = ("debug", "info", "warning", "error")

HELP = """Serve MODEL (a Qwen2/Llama checkpoint directory or hub id) and LoRA adapters over the OpenAI HTTP
API, for the official openai client, lm-eval, LangChain and other OpenAI/vLLM clients: completions
(with echo/prompt_logprobs for likelihood scoring) and chat completions (streamed or not; JSON
schemas, tool calls and multi-turn tool conversations), the models list, adapter loading and
unloading at runtime, hot reload of --adapters-dir, /tokenize, /health and Prometheus /metrics.
Each adapter is a model name; responses say which adapter version answered. Stops gracefully on
SIGTERM/Ctrl-C. Quiet by default: --verbose shows vLLM's and uvicorn's start-up lines.

Runtime adapter loading (POST /v1/load_lora_adapter) accepts only paths inside --adapters-dir;
without an adapters directory it is refused unless --allow-any-adapter-path is given (that lets
any client with the API key make the server read any directory it can access)."""


def _lora_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand."""
    from trainserve.cli import HelpFormatter, fraction, non_negative_float, port, positive_float, positive_int

    p = subparsers.add_parser(
        "serve",
        help="serve a model and its LoRA adapters over the OpenAI HTTP API",
        description=HELP,
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="checkpoint directory or hub id; its model name in the API")
    p.add_argument(
        "--adapters-dir",
        metavar="DIR",
        help="serve every PEFT adapter in DIR under its sub-directory "
        "name; new or changed adapters are picked up without a restart (default: none)",
    )
    p.add_argument(
        "--lora",
        metavar="NAME=PATH",
        action="append",
        type=_lora_arg,
        default=[],
        help="serve the adapter at PATH as model NAME (repeatable; default: none)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=port, default=8000, help="port (0: any free port; the URL is printed)")
    p.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on every route "
        "(default: the TRAINSERVE_API_KEY environment variable, if set)",
    )
    p.add_argument("--served-model-name", help="model id of the base model (default: MODEL as given)")
    p.add_argument("--max-lora-rank", type=positive_int, default=64, help="largest adapter rank accepted")
    p.add_argument("--max-loras", type=positive_int, default=4, help="adapters in one batch (engine LoRA slots)")
    p.add_argument("--gpu-memory-utilization", type=fraction, default=0.5,
                   help="share of the device's memory the engine may reserve (vLLM's --gpu-memory-utilization)")
    p.add_argument("--max-model-len", type=positive_int, help="context length (default: min(2048, the model's))")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: the checkpoint's)")
    p.add_argument(
        "--allow-any-adapter-path",
        action="store_true",
        help="allow /v1/load_lora_adapter to load from any path (only without --adapters-dir)",
    )
    p.add_argument(
        "--adapter-poll-interval",
        type=positive_float,
        default=1.0,
        metavar="SECONDS",
        help="how often --adapters-dir is checked for changes",
    )
    p.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=300.0,
        metavar="SECONDS",
        help="on SIGTERM, how long running requests may take to finish",
    )
    p.add_argument(
        "--max-request-bytes",
        type=positive_int,
        default=8 * 1024 * 1024,
        metavar="N",
        help="largest request body in bytes; larger ones get 413 (default: 8 MiB)",
    )
    p.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="let requests replace the chat template (chat_template, chat_template_kwargs.chat_template); "
        "it is still rendered sandboxed, in a separate process with time and memory limits",
    )
    p.add_argument(
        "--public-health",
        action="store_true",
        help="answer /health, /ping and /metrics without the API key, for load-balancer probes and "
        "Prometheus scrapers (default: off, every route needs the key when --api-key is set)",
    )
    p.add_argument("--log-level", default="info", choices=list(_LEVELS),
                   help="level of the server's own messages (adapter loads, shutdown); uvicorn's follow it "
                   "with --verbose, otherwise they show warnings and errors only")
    p.add_argument("--verbose", action="store_true",
                   help="show vLLM's INFO lines, uvicorn's start-up lines and library start-up warnings "
                   "(also: TRAINSERVE_LOG_LEVEL=info)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, serve until SIGTERM/SIGINT, drain; exit 0, or 1 when the drain timed out or the
    engine stopped (an internal engine error: the running requests got it, and the process exits).

    Quiet by default, like ``trainserve grpo``: ``configure_logging`` runs before vLLM is imported
    (vLLM reads its log level once, at import), other libraries' records below WARNING are dropped,
    and the server's own messages keep ``--log-level``. The first line says what start-up is doing.
    """
    import os

    from trainserve.server.api_key import sendable_key

    from trainserve.logs import configure_logging

    verbose = configure_logging(True if args.verbose else None)  # quiet unless --verbose / TRAINSERVE_LOG_LEVEL
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level if verbose else max(level, logging.WARNING),
                        format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("trainserve").setLevel(level)
    api_key = args.api_key if args.api_key is not None else os.environ.get("TRAINSERVE_API_KEY")
    if api_key is not None and (not api_key.strip() or not sendable_key(api_key)):
        # empty (`--api-key "$KEY"` with KEY unset): refuse rather than serve without authentication;
        # whitespace or control characters: no client could ever send it (HTTP drops a header's
        # surrounding whitespace), so every request would get 401
        source = "--api-key" if args.api_key is not None else "TRAINSERVE_API_KEY"
        problem = ("is empty; give a key, or leave it out to serve without one" if not api_key.strip() else
                   "holds whitespace or control characters, which no client can send in an Authorization "
                   "header; give the key without them")
        print(f"trainserve serve: {source} {problem}", file=sys.stderr)
        return 2
    if args.adapters_dir is not None and not os.path.isdir(args.adapters_dir):
        print(f"trainserve serve: --adapters-dir {args.adapters_dir!r} is not a directory", file=sys.stderr)
        return 2
    if args.adapters_dir is not None and args.allow_any_adapter_path:
        print(
            "trainserve serve: --allow-any-adapter-path cannot be combined with --adapters-dir",
            file=sys.stderr,
        )
        return 2
    print(f"trainserve serve: loading torch and vLLM, then starting the engine on {args.model}",
          file=sys.stderr, flush=True)
    from trainserve.server.runner import make_server, url_of
    from trainserve.server.state import ServerConfig, ServerState
    from transformers import AutoConfig

    from trainserve import FastLanguageModel
    from trainserve.model_api import state_of

    hf_config = AutoConfig.from_pretrained(args.model)
    max_len = args.max_model_len or min(2048, int(getattr(hf_config, "max_position_embeddings", 2048)))
    model, _ = FastLanguageModel.from_pretrained(
        args.model,
        fast_inference=True,
        load_in_4bit=False,
        max_seq_length=max_len,
        max_lora_rank=args.max_lora_rank,
        max_loras=args.max_loras,
        gpu_memory_utilization=args.gpu_memory_utilization,
        dtype=None if args.dtype == "auto" else args.dtype,
    )
    mstate = state_of(model)
    config = ServerConfig(
        served_model_name=args.served_model_name or args.model,
        api_key=api_key,
        adapters_dir=args.adapters_dir,
        allow_any_adapter_path=args.allow_any_adapter_path,
        adapter_poll_interval=args.adapter_poll_interval,
        max_lora_rank=args.max_lora_rank,
        drain_timeout=args.drain_timeout,
        max_request_bytes=args.max_request_bytes,
        trust_request_chat_template=args.trust_request_chat_template,
        public_health=args.public_health,
    )
    state = ServerState(mstate.engine, mstate.config, config)
    try:
        for name, path in args.lora:
            entry, _ = state.models.load(name, path, source="cli")
            logger.info("serving adapter %s from %s", entry.label, path)
    except Exception as exc:  # AdapterError, or a reserved/invalid name
        print(f"trainserve serve: cannot serve adapter: {getattr(exc, 'message', exc)}", file=sys.stderr)
        state.close()
        return 2
    state.start()

    def announce(server: Any) -> None:
        print(
            f"trainserve: serving {config.served_model_name} at {url_of(args.host, server.port)}", flush=True
        )

    uvicorn_level = args.log_level if verbose else max(args.log_level, "warning", key=_LEVELS.index)
    server = make_server(state, args.host, args.port, log_level=uvicorn_level, on_started=announce,
                         exit_on_engine_death=True)
    try:
        server.run()
    finally:
        state.close()
        state.loop.stop_background(drain=True)
    if not server.started:
        return 1
    if server.engine_died:  # its requests were failed; exit non-zero so a supervisor restarts the server
        print(f"trainserve serve: the engine stopped: {state.loop.fatal!r}", file=sys.stderr)
        return 1
    if server.drained_cleanly is False:  # requests were cut off: not a clean exit
        logger.warning("stopped: the drain timed out with requests still running")
        return 1
    logger.info("stopped")
    return 0
