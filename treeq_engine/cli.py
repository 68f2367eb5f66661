"""The ``treeq`` command (also ``python -m treeq_engine``). Each subcommand lives in its own module and is
imported only when run, so ``treeq --help`` stays fast."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:22s} {v}")
    return 0


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from . import selfcheck

    return selfcheck.main()


def _search_args(p: argparse.ArgumentParser) -> None:
    from .search.cli import add_arguments

    add_arguments(p)


def _cmd_search(args: argparse.Namespace) -> int:
    from .search.cli import run

    return run(args)


# name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "info": ("what was built and what this machine can run",
             lambda p: p.add_argument("--json", action="store_true", help="print JSON"), _cmd_info),
    "selfcheck": ("check the numeric format and the compiled core against the oracle", lambda p: None,
                  _cmd_selfcheck),
    "search": ("search a mixed-precision plan (Tree-Structured Search + ENG) at a budget", _search_args,
               _cmd_search),
    "triton-aot": ("compile the Triton/Gluon kernels for sm_80/sm_90a without a GPU; report registers and SASS",
                   lambda p: __import__("treeq_engine.kernels.triton.aot", fromlist=["aot"]).add_arguments(p),
                   lambda a: __import__("treeq_engine.kernels.triton.aot", fromlist=["aot"]).run(a)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treeq", description="TreeQ Engine: mixed-precision DiT quantization")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
