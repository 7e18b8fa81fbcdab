"""`jetserve` command line: one subcommand per module in `server/commands/`.

Each command module defines `add_arguments(parser)` and `run(args) -> int`. Modules are imported only
when their command runs, so `jetserve serve --help` does not import the quantization stack.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "serve": "Serve models over the OpenAI-compatible HTTP API",
    "demo": "Prepare the offline demo model store (SmolLM2-135M bf16, GPTQ, AWQ)",
    "quantize": "Quantize an fp16/bf16 Hugging Face model with GPTQ or AWQ (GPTQModel)",
    "eval": "Compare models on perplexity, decode tokens/s, TTFT and memory",
    "generate": "Generate text with the jetserve runtime",
}


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jetserve", description="On-device LLM inference server for NVIDIA Jetson")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv_command == name:
            mod = importlib.import_module(f"server.commands.{name}")
            mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(args, "log_level", "info").upper()
        if isinstance(getattr(args, "log_level", None), str)
        else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    mod = importlib.import_module(f"server.commands.{args.command}")
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
