"""The octoroute command: serve the gateway, check a config, build the demo experts, train or evaluate the router."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.config import DEFAULT_DEMO_DIR, ConfigError, GatewayConfig, load_config

EXAMPLES = """examples:
  octoroute serve                                   # embedded default: bundled router, demo experts
  octoroute serve --config deploy/config.example.yaml --port 8080
  octoroute config check my.yaml
  octoroute router train --help
"""


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from gateway.app import create_app
    from gateway.http_limits import uvicorn_config
    from gateway.logs import setup_logging
    from gateway.routing import RoutingService
    from gateway.state import load_configured_router

    config = load_config(args.config)
    if args.config is None:
        from gateway.experts.demo import ensure_demo_experts

        ensure_demo_experts(DEFAULT_DEMO_DIR)
    setup_logging(config.logging.level, config.logging.json_format)
    host = args.host or config.server.host
    port = args.port or config.server.port
    router, router_kind = load_configured_router(config)
    RoutingService.label_map(router, config)  # a label with no expert is a config error: say it before serving
    app = create_app(config, router=router, router_kind=router_kind)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            """On SIGTERM/SIGINT, /ready turns 503 at once, while in-flight requests finish until the drain
            deadline (gateway/shutdown.py), which ends the rest with an error the client can read.

            A drained SIGTERM is a normal stop: exit 0 rather than re-raising the signal as uvicorn does."""
            state = getattr(app.state, "octoroute", None)
            if state is not None:
                state.shutdown.draining = True
                asyncio.get_running_loop().call_soon_threadsafe(state.shutdown.begin, config.server.shutdown_grace_s)
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                self._captured_signals.remove(sig)

        async def startup(self, sockets: list[Any] | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # bound: say where (uvicorn's own line is silenced at log level warning)
                logging.getLogger("octoroute.app").info(
                    "listening on http://%s:%d (octoroute %s)", host, port, __version__,
                    extra={"host": host, "port": port, "version": __version__})

    server = Server(uvicorn_config(app, config.server, host, port,
                                   # Seconds as given: int() cut 1.5 to 1, and 0.5 to 0 -> None, i.e. no deadline.
                                   # uvicorn hints int, but hands it to asyncio.wait_for, which takes any number.
                                   timeout_graceful_shutdown=config.server.shutdown_grace_s))
    server.run()
    return 0 if server.started else 1


def _config_check(args: argparse.Namespace) -> int:
    config: GatewayConfig = load_config(args.file)
    names = ", ".join(f"{e.name} ({e.backend})" for e in config.experts)
    print(f"{args.file}: OK — experts: {names}; cache: {config.cache.backend}; router: {config.router.kind}")
    return 0


def _build_demo(args: argparse.Namespace) -> int:
    from gateway.experts.demo import build_demo_experts

    build_demo_experts(Path(args.out), data=Path(args.data) if args.data else None)
    print(f"demo experts written to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["router"] and argv[1:2] in (["train"], ["eval"]):  # the router owns its own flags
        if argv[1] == "train":
            from router_model.train import main as train_main
            return int(train_main(argv[2:]) or 0)
        from router_model.eval import main as eval_main
        return int(eval_main(argv[2:]) or 0)

    parser = argparse.ArgumentParser(prog="octoroute", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"octoroute {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway (embedded default without --config)")
    serve.add_argument("--config", help="YAML config file (default: embedded default)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1, or server.host)")
    serve.add_argument("--port", type=int, help="TCP port (default 8000, or server.port)")
    serve.set_defaults(func=_serve)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="action", required=True)
    check = config_sub.add_parser("check", help="validate a config file (env overrides applied)")
    check.add_argument("file")
    check.set_defaults(func=_config_check)

    experts = sub.add_parser("experts", help="expert tools")
    experts_sub = experts.add_subparsers(dest="action", required=True)
    demo = experts_sub.add_parser("build-demo", help="build the small demonstration experts")
    demo.add_argument("--out", default=str(DEFAULT_DEMO_DIR),
                      help="directory to write the five experts to (default: %(default)s, where "
                           "octoroute serve looks for them)")
    demo.add_argument("--data", help="routing JSONL to train on (default: shared/data/routing/train.jsonl)")
    demo.set_defaults(func=_build_demo)

    router = sub.add_parser("router", help="train or evaluate the router model (see: octoroute router train --help)")
    router.add_argument("action", choices=["train", "eval"])

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"octoroute: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
