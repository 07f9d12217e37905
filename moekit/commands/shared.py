"""What every `moekit train <family>` and `moekit eval <family>` command shares.

Train commands take the same flags: `--config` (a YAML file, or the name of a config shipped with
moekit: `moekit configs` lists them), `KEY=VALUE` overrides (`train.lr=1e-3`; a key without a
section is a train key), `--out`, `--seed` / `--seeds`, `--device`, `--no-progress`, `--resume`,
`--overwrite`, `--data-dir`, and one flag per config field whose name is unique in the config
(`--lr`, `--num-experts`, ...), generated from the config dataclasses so `--help` lists every key
with its default and meaning. Precedence: defaults < config file < flags < KEY=VALUE.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moekit.config import ConfigError, apply_overrides, describe_default, field_docs, parse_value, set_path

SECTIONS = ("model", "data", "train")
SHARED = ("seed", "device", "progress")  # train keys every family has, always offered as flags


def config_files() -> dict[str, Path]:
    """{name: path} of the example configs shipped inside the package (moekit/configs/<family>/*.yaml)."""
    root = Path(__file__).resolve().parents[1] / "configs"
    return {p.stem: p for p in sorted(root.glob("*/*.yaml"))}


def resolve_config_path(name: str) -> Path:
    """A YAML path, or the name of a shipped config (`shakespeare_moe`)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = config_files()
    if name in shipped:
        return shipped[name]
    if path.suffix in (".yaml", ".yml") or os.sep in name:
        raise ConfigError(f"config file {path} does not exist (shipped configs: {', '.join(shipped)})")
    raise ConfigError(f"no config named {name!r}; shipped configs: {', '.join(shipped)} (or pass a YAML path)")


# --- flags generated from the config --------------------------------------------------------


@dataclasses.dataclass
class Leaf:
    path: tuple[str, ...]
    hint: Any
    default: str
    doc: str


def config_leaves(config_class: type) -> list[Leaf]:
    """Every settable field below the sections, nested dataclasses included (not optional ones)."""
    leaves: list[Leaf] = []

    def walk(cls: type, prefix: tuple[str, ...]) -> None:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, prefix + (f.name,))
            else:
                leaves.append(Leaf(prefix + (f.name,), hint, describe_default(f), docs.get(f.name, "")))

    walk(config_class, ())
    return leaves


def _flag_type(hint: Any) -> Callable[[str], Any]:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
    if typing.get_origin(base) in (tuple, list):
        return lambda text: [parse_value(v.strip()) for v in text.split(",") if v.strip()]
    return parse_value


def add_train_arguments(parser: argparse.ArgumentParser, config_class: type, family: str,
                        aliases: dict[str, str] | None = None, data_dir_key: str = "data.data_dir") -> None:
    """The shared flags plus one flag per uniquely-named config field (see the module docstring)."""
    aliases = aliases or {}
    run = parser.add_argument_group("run")
    run.add_argument("--config", metavar="NAME|FILE",
                     help="YAML config: a file, or the name of a shipped config (`moekit configs` lists them)")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="set config keys, e.g. train.lr=1e-3 model.num_experts=4 (no section: train)")
    run.add_argument("--out", metavar="DIR",
                     help=f"run folder (default: runs/{family}-<date>-<time> in the current folder)")
    run.add_argument("--seeds", nargs="+", metavar="S",
                     help="train one run per seed into OUT/seed-S and report mean ± std")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    run.add_argument("--data-dir", dest=f"cfg:{data_dir_key}", metavar="DIR", default=argparse.SUPPRESS,
                     help=f"the data's folder or file (sets {data_dir_key}; default: $MOEKIT_DATA, then "
                          "data shipped with moekit where there is some)")
    leaves = config_leaves(config_class)
    counts: dict[str, int] = {}
    for leaf in leaves:
        counts[leaf.path[-1]] = counts.get(leaf.path[-1], 0) + 1
    groups = {name: parser.add_argument_group(f"{name} (config section `{name}`)") for name in SECTIONS}
    taken = {a.lstrip("-") for a in ("--config", "--out", "--seeds", "--resume", "--overwrite", "--data-dir")}
    for flag, key in aliases.items():
        leaf = next(lf for lf in leaves if ".".join(lf.path) == key)
        groups[leaf.path[0]].add_argument(f"--{flag}", dest=f"cfg:{key}", type=_flag_type(leaf.hint),
                                          default=argparse.SUPPRESS, metavar="VALUE",
                                          help=f"sets {key}: {_help(leaf)}")
        taken.add(flag)
    for leaf in leaves:
        name = leaf.path[-1].replace("_", "-")
        key = ".".join(leaf.path)
        if counts[leaf.path[-1]] > 1 or name in taken or key == data_dir_key:
            continue
        taken.add(name)
        group = groups.get(leaf.path[0], parser)
        if leaf.hint is bool:
            group.add_argument(f"--{name}", dest=f"cfg:{key}", action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=f"{_help(leaf)}")
        else:
            group.add_argument(f"--{name}", dest=f"cfg:{key}", type=_flag_type(leaf.hint), metavar="VALUE",
                               default=argparse.SUPPRESS, help=_help(leaf))
    parser.epilog = ("Every key can also be set as section.key=value; keys without a section are train keys. "
                     "A flag's value is read as YAML (1e-3, null, [64, 32]); list flags also take 64,32.")


def _help(leaf: Leaf) -> str:
    text = leaf.doc or ""
    return (f"{text} (default: {leaf.default})" if text else f"default: {leaf.default}").replace("%", "%%")


def config_from_args(args: argparse.Namespace, config_class: type, base: dict | None = None) -> Any:
    """The run config: defaults (or `base`, a resumed run's config) < --config file < flags <
    KEY=VALUE overrides, checked and typed."""
    from moekit.config import build_dataclass, read_yaml

    data: dict = base or {}
    if args.config:
        _merge(data, read_yaml(resolve_config_path(args.config)))
    for name, value in vars(args).items():
        if name.startswith("cfg:"):
            set_path(data, name[4:].split("."), value)
    apply_overrides(data, args.overrides, default_section="train", sections=SECTIONS)
    return build_dataclass(config_class, data, "config")


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _copy(sections: dict | None) -> dict | None:
    import copy

    return copy.deepcopy(sections)


def saved_sections(family: str, folder: Path) -> dict | None:
    """The model / data / train sections of the run in `folder` (to resume it with its own settings)."""
    from moekit.config import config_dict
    from moekit.train.families import expect_family, family_module
    from moekit.train.run import is_run_folder

    if not (folder / "config.json").is_file():
        if is_run_folder(folder):
            raise ConfigError(f"cannot resume {folder}: its config.json is missing")
        return None
    header = expect_family(folder, family, f"moekit train {family} --resume")
    return config_dict(family_module(family).config_from_run(header))


def split_seeds(args: argparse.Namespace) -> None:
    """`--seeds 0 1 2 train.lr=1e-3`: argparse hands the overrides after a list flag to the list; the
    integers are the seeds, the KEY=VALUE items go back to the overrides."""
    if not args.seeds:
        return
    seeds, overrides = [], []
    for item in args.seeds:
        if "=" in item:
            overrides.append(item)
            continue
        try:
            seeds.append(int(item))
        except ValueError:
            raise ConfigError(f"--seeds takes integers (got {item!r})") from None
    if not seeds:
        raise ConfigError("--seeds needs at least one integer")
    args.seeds, args.overrides = seeds, [*args.overrides, *overrides]


def with_seed(config: Any, seed: int) -> Any:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))


def run_mode(args: argparse.Namespace) -> str:
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    return "resume" if args.resume else "overwrite" if args.overwrite else "new"


def default_out(family: str) -> Path:
    return Path("runs") / f"{family}-{time.strftime('%Y%m%d-%H%M%S')}"


def train_runs(args: argparse.Namespace, family: str, config_class: type, fit: Callable[..., Any],
               base: dict | None = None) -> list:
    """Fit one run (`--seed`) or one per seed (`--seeds`, into OUT/seed-S); returns the results.
    `base`: config sections that replace the defaults of a new run (e.g. the model of `--init DIR`)."""
    mode = run_mode(args)
    split_seeds(args)
    if mode == "resume" and not args.out:
        raise ConfigError("--resume needs --out: the run folder to continue")
    out = Path(args.out) if args.out else default_out(family)
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds lists a seed twice: {args.seeds}")
    folders = [out / f"seed-{s}" for s in args.seeds] if args.seeds else [out]
    runs = []
    for i, folder in enumerate(folders):
        # A resumed run starts from its own saved config; flags and overrides then say what changes.
        start = saved_sections(family, folder) if mode == "resume" else None
        config = config_from_args(args, config_class, start or _copy(base))
        runs.append((with_seed(config, args.seeds[i]) if args.seeds else config, folder))
    results = []
    for cfg, folder in runs:
        if len(runs) > 1:
            print(f"--- seed {cfg.train.seed}: {folder}", file=sys.stderr)
        results.append(fit(cfg, folder, mode=mode))
    if len(runs) > 1 and _is_main():
        from moekit.io import atomic_write_json
        from moekit.train.results import summarize_seeds

        atomic_write_json(out / "summary.json", {"seeds": list(args.seeds), "test": summarize_seeds(results)})
    return results


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print_test_summary(results: list, title: str = "test") -> None:
    """The test metrics of one run, or mean ± std over several seeds, as a table."""
    from moekit.train.results import format_mean_std, summarize_seeds

    if not _is_main():
        return
    summary = summarize_seeds(results)
    seeds = f"{len(results)} seeds" if len(results) > 1 else "1 seed"
    print(f"\n{title} ({seeds}):")
    width = max(len(k) for k in summary)
    for name, entry in summary.items():
        print(f"  {name:<{width}}  {format_mean_std(entry)}")


# --- eval -----------------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, metavar="RUN", help="a run folder written by `moekit train`")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="read the data from here instead of the folder the run was trained on")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0, help="random seed (evaluation itself is deterministic)")
