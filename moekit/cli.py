"""The `moekit` command line: a thin table of subcommands, each a module in `moekit.commands`.

Each command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`, and
imports its heavy dependencies inside `run`, so `moekit --help` stays fast. `main(argv)` returns an
exit code and never calls `sys.exit`, so tests can run it in-process.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from moekit import __version__

# (command words) -> module implementing it. Add a line here to add a subcommand.
COMMANDS: dict[tuple[str, ...], str] = {
    ("demo",): "moekit.commands.demo",
    ("info",): "moekit.commands.info",
    ("configs",): "moekit.commands.configs",
    ("bench", "layer"): "moekit.commands.bench_layer",
    ("train", "lm"): "moekit.commands.train_lm",
    ("train", "mtl"): "moekit.commands.train_mtl",
    ("train", "seqrec"): "moekit.commands.train_seqrec",
    ("train", "two-tower"): "moekit.commands.train_two_tower",
    ("train", "dqn"): "moekit.commands.train_dqn",
    ("eval", "lm"): "moekit.commands.eval_lm",
    ("eval", "mtl"): "moekit.commands.evaluate",
    ("eval", "seqrec"): "moekit.commands.evaluate",
    ("eval", "two-tower"): "moekit.commands.evaluate",
    ("eval", "dqn"): "moekit.commands.evaluate",
    ("predict", "mtl"): "moekit.commands.predict",
    ("generate",): "moekit.commands.generate",
    ("recommend",): "moekit.commands.recommend",
    ("retrieve",): "moekit.commands.retrieve",
    ("checkpoint", "merge"): "moekit.commands.checkpoint_merge",
    ("checkpoint", "reshard"): "moekit.commands.checkpoint_reshard",
    ("hf", "import"): "moekit.commands.hf_import",
    ("hf", "export"): "moekit.commands.hf_export",
    ("hf", "upcycle"): "moekit.commands.hf_upcycle",
    ("analyze", "routing"): "moekit.commands.analyze_routing",
}

# Group help for commands that only hold subcommands.
GROUP_HELP = {
    "bench": "measure moekit's MoE layer",
    "train": "train a model into a run folder",
    "eval": "evaluate a trained model from its run folder",
    "predict": "score new rows with a trained model",
    "checkpoint": "merge or re-shard expert-parallel checkpoints",
    "hf": "Hugging Face checkpoints in and out: import, export, upcycle",
    "analyze": "look inside a trained or imported model",
}

# glibc hands large freed buffers back to the OS after every call unless these are raised; for
# the big, short-lived activations of training that costs up to ~2.5x on a CPU matmul.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


class CommandError(Exception):
    """A user-facing error: printed as one line, without a traceback (unless --debug)."""


def build_parser() -> argparse.ArgumentParser:
    """The whole `moekit` parser, built from `COMMANDS` (each command module adds its own flags)."""
    parser = argparse.ArgumentParser(
        prog="moekit",
        description="Mixture-of-Experts layers, language models and recommenders for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help=f"do not restart the process with GLIBC_TUNABLES={MALLOC_TUNABLES} (Linux only)",
    )
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        subparsers = top
        for depth, word in enumerate(words[:-1]):
            key = " ".join(words[: depth + 1])
            if key not in groups:
                group = subparsers.add_parser(word, help=GROUP_HELP.get(key, ""))
                groups[key] = group.add_subparsers(dest=f"command_{depth + 1}", metavar="SUBCOMMAND",
                                                   required=True)
            subparsers = groups[key]
        text = module.HELP if isinstance(module.HELP, str) else module.HELP[words[-1]]
        sub = subparsers.add_parser(words[-1], help=text, description=text,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(_module=module, command_words=words)
    return parser


def _tune_malloc_and_reexec(argv: Sequence[str]) -> None:
    """Restart the process once with the glibc malloc tunables set (they only act at start-up)."""
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ or os.environ.get("MOEKIT_NO_REEXEC"):
        return
    env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES, MOEKIT_NO_REEXEC="1")
    os.execve(sys.executable, [sys.executable, "-m", "moekit", *argv], env)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `moekit` command line on `argv` (default: sys.argv); returns the exit code (2: bad input)."""
    as_program = argv is None  # only the real program re-executes itself; tests call main(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # KEY=VALUE overrides may come after options too (argparse stops a positional list at an option).
        stray = [a for a in extra if "=" not in a or a.startswith("-") or not hasattr(args, "overrides")]
        if stray:
            parser.parse_args(argv)  # prints argparse's usage error and exits 2
        if extra:
            args.overrides = [*args.overrides, *extra]
    except SystemExit as exit_:  # --help, or a usage error argparse has already printed
        return int(exit_.code or 0)
    if as_program and not args.no_malloc_tuning and getattr(args._module, "TUNE_MALLOC", False):
        _tune_malloc_and_reexec(argv)
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print("moekit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moekit ... | head` closed the pipe: stop quietly, as other tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (CommandError, ValueError, FileNotFoundError, OSError, RuntimeError, EOFError) as error:
        if args.debug:
            raise
        print(f"moekit: error: {one_line(error)}", file=sys.stderr)
        return 2


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line messages from libraries are joined)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text


if __name__ == "__main__":
    sys.exit(main())
