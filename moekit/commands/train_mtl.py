"""`moekit train mtl`: multi-task rankers (Shared-Bottom, OMoE, MMoE, PLE) on Census-Income."""

from __future__ import annotations

import argparse

HELP = ("train a multi-task ranker (shared_bottom, omoe, mmoe, ple) on your table (--data FILE --tasks a,b) "
        "or Census-Income")
TUNE_MALLOC = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moekit.commands.shared import add_train_arguments
    from moekit.train.mtl import MTLConfig

    add_train_arguments(parser, MTLConfig, "mtl", aliases={"model": "model.architecture", "data": "data.path"})


def run(args: argparse.Namespace) -> int:
    from moekit.commands.shared import print_test_summary, train_runs
    from moekit.plots import gate_heatmap
    from moekit.train.mtl import MTLConfig, fit, gate_table

    results = train_runs(args, "mtl", MTLConfig, fit)
    print_test_summary(results)
    first = results[0]
    if first.extra["gates"]:
        print("\nmean gate weight per expert (test split" + (", first seed)" if len(results) > 1 else ")"))
        print(gate_table(first.extra["gates"], first.extra["expert_names"]))
        for result in results:
            if result.out is not None:
                panel = {result.extra["architecture"]: (result.extra["gates"], result.extra["expert_names"])}
                path = gate_heatmap(panel, result.out / "gates.png",
                                    f"{result.extra['data']}: mean gate weight per expert",
                                    unreachable=result.extra.get("unreachable"))
                print(f"gate heatmap: {path}")
    for result in results:
        print(f"run folder: {result.out}")
    return 0
