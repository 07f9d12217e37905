"""`moekit configs`: the example configs shipped with moekit, usable by name from any folder."""

from __future__ import annotations

import argparse

HELP = "list the example configs shipped with moekit (use one with `moekit train FAMILY --config NAME`)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="print this config's YAML")


def run(args: argparse.Namespace) -> int:
    from moekit.commands.shared import config_files, resolve_config_path

    if args.name:
        print(resolve_config_path(args.name).read_text(encoding="utf-8"), end="")
        return 0
    files = config_files()
    width = max(len(name) for name in files)
    for name, path in files.items():
        first = next((line.lstrip("# ").strip() for line in path.read_text(encoding="utf-8").splitlines()
                      if line.startswith("#")), "")
        print(f"{name:<{width}}  {path.parent.name:<9}  {first}")
    return 0
