"""``shoprank console``: the web console (search with explain, shoppers, models, quality, live)."""

from __future__ import annotations

import argparse

from core.settings import ConsoleSettings, Settings


def cmd_console(args: argparse.Namespace, settings: Settings) -> int:
    from console.app import serve

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        console = ConsoleSettings(**{**settings.console.model_dump(), **overrides})
        settings = settings.model_copy(update={"console": console})
    serve(settings)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("console", help="serve the web console: search with explain, shoppers, model "
                                       "versions, quality plots, live figures")
    p.add_argument("--host", default=None, help="listen here (default SHOPRANK_CONSOLE_HOST)")
    p.add_argument("--port", type=int, default=None, help="and on this port (default SHOPRANK_CONSOLE_PORT)")
    p.set_defaults(func=cmd_console)
