"""Does pre-training help a task? A run fine-tuned on one task against the same model trained from
scratch on it, for the same steps, both scored by ``make eval`` on the held-out shards, per seed.

Needs a dataset root with a finished pre-training run (``make demo`` leaves ``runs/tiny`` in
``data/default``). For each seed, two runs of the same recipe (``train.task``, budgets, steps,
batch): ``transfer-ft-s<seed>`` starts from the pre-trained run (``make finetune``),
``transfer-scratch-s<seed>`` from a fresh initialisation (``make train``). The seed sets the
initialisation of what is new, the masks, the crops and the data order. Printed side by side: the
training loss at the first and last logged step, and each of the target's eval figures.

    .venv/bin/python bench/transfer.py [--root data/default] [--from-run tiny] [--inputs rgb_pixels]
        [--targets canny_edge] [--steps 60] [--seeds 0 1 2] [--set KEY=VALUE ...]

Canny edges by default: their labels are a real algorithm's offline, unlike the random-weight
networks' pseudo-labels, so a better score means a better model.
"""

from __future__ import annotations

import argparse
import json
import statistics

from four_m.core.config import load_config
from four_m.core.dataset_root import DatasetRoot
from four_m.train.evaluate import run_eval
from four_m.train.run import run_finetune, run_train


def recipe(args: argparse.Namespace, run: str, seed: int) -> list[str]:
    """The task recipe both arms train with, as ``train.*`` overrides."""
    task = f"{{inputs: [{', '.join(args.inputs)}], targets: [{', '.join(args.targets)}]}}"
    return [
        f"train.run={run}",
        f"train.task={task}",
        f"train.input_budget={args.budget}",
        f"train.target_budget={args.budget}",
        f"train.max_steps={args.steps}",
        f"train.warmup_steps={max(1, args.steps // 10)}",
        f"train.seed={seed}",
        f"train.checkpoint_every_n_steps={args.steps}",
    ]


def one_arm(args: argparse.Namespace, arm: str, seed: int) -> dict[str, float]:
    run = f"transfer-{arm}-s{seed}"
    overrides = [*args.set, *recipe(args, run, seed)]
    if arm == "ft":  # the recipe as the fine-tune's train section, over any the config has
        overrides = [f"finetune.{o}" if o.startswith("train.") else o for o in overrides]
        overrides.append(f"finetune.from_run={args.from_run}")
    config = load_config(args.config, overrides, root=args.root)
    summary = run_finetune(config) if arm == "ft" else run_train(config)
    run_eval(config.finetuned() if arm == "ft" else config)
    figures = json.loads((DatasetRoot(config.root) / f"runs/{run}/eval/metrics.json").read_text())["results"]
    row = {"first loss": summary.losses[0][1], "last loss": summary.losses[-1][1]}
    for target in args.targets:
        for metric, cells in figures[target].items():
            if metric != "samples":
                row[f"{target} {metric}"] = cells["model"]
                row[f"{target} {metric} (baseline)"] = cells["baseline"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--root", default="data/default")
    parser.add_argument("--from-run", default="tiny")
    parser.add_argument("--inputs", nargs="+", default=["rgb_pixels"])
    parser.add_argument("--targets", nargs="+", default=["canny_edge"])
    parser.add_argument("--budget", type=int, default=196, help="input and target budget (a 14x14 grid whole)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    results = {arm: [one_arm(args, arm, seed) for seed in args.seeds] for arm in ("ft", "scratch")}
    task = f"{'+'.join(args.inputs)} -> {', '.join(args.targets)}"
    print(f"\n{task}, {args.steps} steps, seeds {args.seeds}, root {args.root}; fine-tuned from run {args.from_run}")
    print(
        f"| figure | {' | '.join(f'fine-tuned s{s}' for s in args.seeds)} | mean | "
        f"{' | '.join(f'scratch s{s}' for s in args.seeds)} | mean |"
    )
    print("|---|" + "---|" * (2 * len(args.seeds) + 2))
    for figure in results["ft"][0]:
        cells = []
        for arm in ("ft", "scratch"):
            values = [row[figure] for row in results[arm]]
            cells += [f"{v:.4g}" for v in values] + [f"{statistics.fmean(values):.4g}"]
        print(f"| {figure} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
