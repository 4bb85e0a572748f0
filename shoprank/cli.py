"""``shoprank <command>``: each package contributes its own subcommands through ``register``.

Command modules import their heavy dependencies (torch, faust, onnxruntime) inside the command,
so ``shoprank --help`` stays fast and the scorer never pulls in torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from core.logs import configure_logging
from core.settings import load_settings

# Each module defines ``register(subparsers)``; a subcommand sets ``func(args, settings) -> int``.
COMMAND_MODULES = (
    "core.commands",
    "replay.commands",
    "evaluation.commands",
    "trainer.commands",
    "scorer.commands",
    "shoprank.demo",
    "streams.commands",
    "console.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoprank", description="Streaming, real-time personalization for e-commerce search."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings()
    configure_logging(settings.log_level)
    try:
        return int(args.func(args, settings) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
