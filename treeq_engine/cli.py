"""The ``treeq`` command (also ``python -m treeq_engine``). Each subcommand lives in its own module, named in
``COMMANDS``, and is imported only when that subcommand is chosen, so ``treeq --help`` stays fast."""
from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
from typing import NamedTuple, Sequence


class Command(NamedTuple):
    help: str
    module: str                    # relative to treeq_engine
    add_arguments: str = "add_arguments"
    run: str = "run"


COMMANDS: dict[str, Command] = {
    "info": Command("what was built and what this machine can run", ".info", "add_cli_arguments", "run_cli"),
    "selfcheck": Command("check the numeric format and the compiled core against the oracle", ".selfcheck",
                         "add_arguments", "run_cli"),
    "demo": Command("quantize the digits DiT at W8A8/W4A8/W4A4/W3A3, sample, and compare with FP and real digits",
                    ".demo"),
    "search": Command("search a mixed-precision plan (Tree-Structured Search + ENG) at a budget", ".search.cli"),
    "capture": Command("record the transformer calls of a local diffusers pipeline the search cuts (the README's "
                       "table of models) as calibration inputs for `treeq search / ptq / peft --diffusers`",
                       ".search.capture_cli"),
    "ptq": Command("calibrate a DiT (or a searched diffusers transformer) for a plan: weight/activation clipping, "
                   "Monarch or low-rank branches (resumable)", ".calib.cli", "add_ptq_args", "run_ptq"),
    "peft": Command("fine-tune a calibrated model's branches by distillation from the FP model (resumable)",
                    ".calib.cli", "add_peft_args", "run_peft"),
    "quantize": Command("pack a DiT or any diffusers transformer with a plan (or --uniform WxAy) into a TreeQ "
                        "artifact (safetensors + plan JSON)",
                        ".runtime.cli", "add_quantize_arguments", "run_quantize"),
    "sample": Command("sample a full-precision DiT or a quantized artifact into a PNG grid", ".runtime.cli",
                      "add_sample_arguments", "run_sample"),
    "profile": Command("measure every (layer shape x format x tokens) into the latency table `treeq search` reads",
                       ".runtime.profile"),
    "triton-aot": Command("compile the Triton/Gluon kernels for sm_80/sm_90a without a GPU; report registers and "
                          "SASS", ".kernels.triton.aot"),
}


RESUMABLE = ("ptq", "peft")   # a rerun with the same --out continues them


def _resolve(name: str, attr: str):
    module = importlib.import_module(COMMANDS[name].module, __package__)
    return getattr(module, attr)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's default in its help, once: also for options without help text (which argparse's
    ArgumentDefaultsHelpFormatter skips) and not where the text already says it; none for required options, flags
    and options without a default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.required or default is None or default is argparse.SUPPRESS or isinstance(default, bool)
                or not action.option_strings or "default" in text or default in ("", [], ())):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})".lstrip()

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings:   # argparse prints no help line for these at all
            text = self._get_help_string(action)
            if text:
                action = copy.copy(action)
                action.help = text
        return super()._format_action(action)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments (all of them for ``None``)."""
    parser = argparse.ArgumentParser(prog="treeq", description="TreeQ Engine: mixed-precision DiT quantization")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help,
                           formatter_class=_DefaultsFormatter)
        if command is None or name == command:
            _resolve(name, cmd.add_arguments)(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # diffusers' and transformers' load-time chatter (accelerate missing, fp32-kept modules, tokenizer notes) buries
    # our output on the command line; their own variables still choose (set before they are imported)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else "")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    device = getattr(args, "device", None)
    if isinstance(device, str):
        import torch

        try:
            torch.device(device)
        except RuntimeError:
            print(f"treeq {args.command}: error: --device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)",
                  file=sys.stderr)
            return 2
    if isinstance(device, str) and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"treeq {args.command}: error: --device {device}, but no CUDA device is available to torch "
                  "(`treeq info` says what this machine has; use --device cpu)", file=sys.stderr)
            return 2
    try:
        return int(_resolve(args.command, COMMANDS[args.command].run)(args) or 0)
    except BrokenPipeError:   # `treeq info | head`: the reader left; no traceback about it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        again = f"; run the same command again to resume from {args.out}" if args.command in RESUMABLE else ""
        print(f"treeq {args.command}: interrupted{again}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:   # bad input and files: one line, not a traceback (bugs keep theirs)
        if os.environ.get("TREEQ_DEBUG"):
            raise
        print(f"treeq {args.command}: error: {_unprefixed(str(e), args.command)} ({type(e).__name__}; "
              "TREEQ_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except SystemExit as e:   # a command refusing its options (SystemExit("message")): the same line and status
        if not isinstance(e.code, str):
            raise
        print(f"treeq {args.command}: error: {_unprefixed(e.code, args.command)}", file=sys.stderr)
        return 2


def _unprefixed(message: str, command: str) -> str:
    """A message without the ``treeq COMMAND:`` its raiser put in front (this prints it once)."""
    prefix = f"treeq {command}: "
    return message[len(prefix):] if message.startswith(prefix) else message


if __name__ == "__main__":
    sys.exit(main())
