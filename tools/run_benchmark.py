"""Run the benchmark matrix and summarise it: variants x seeds x scopes, test metrics of the checkpoint
chosen on validation, mean ± std over seeds, per service.

A *scope* is what one model is trained on: ``joint`` (every service of the config at once) or one
service alone (``per_service`` expands to one scope per service). A *variant* is the FFN: ``dense``
(the all-dense twin with the same active parameters per token) or an MoE routed by ``token``,
``domain`` or ``domain_user``; or a baseline on the scope's data: ``sasrec`` (one SASRec per
service, the config's ``sasrec`` section, ``sasrec.seed`` the run's seed) or ``popularity`` (no
seed: one run is enough). Every scope prepares its data, semantic IDs and sequences once; each
(variant, seed) run links to them, trains (best checkpoint by ``train.best_metric`` on validation)
and evaluates that checkpoint on the test split (exact scoring for the item-level model,
constrained beam search for the token-level one).

Every step runs as its own ``moe-rec`` process and is skipped when its output exists, so an
interrupted matrix resumes where it stopped, and parts of one matrix can run as separate commands
(one per core, or one a day) or as one command with ``--jobs N`` (N runs at once once the scopes
are prepared: several small runs sharing one GPU, say). ``--time-limit`` starts nothing after it
and stops the steps still running (a training resumes from its last checkpoint on the next call);
the command names what did not finish and exits 1 only when a step failed. ``summary.md`` and
``summary.json`` cover every finished run under ``--root``, not only this command's;
``--summary-only`` rewrites them and starts nothing. Examples::

    # the published benchmark, ablation on the joint model, 3 seeds (a GPU node: --launch)
    python tools/run_benchmark.py --config configs/experiments/amazon2014.yaml --root runs/bench \\
        --launch "launch/single_node.sh 8"
    # per-service models of the best variant only
    python tools/run_benchmark.py --config configs/experiments/amazon2014.yaml --root runs/bench \\
        --scopes per_service --variants domain_user
    # the table of every finished run so far, while others are still training
    python tools/run_benchmark.py --root runs/bench --summary-only
    # the item-level table of docs/RESULTS.md: the joint recipe and its dense twin, one model per
    # service (their own recipe), our tuned SASRec and popularity, 3 seeds, in one root
    python tools/run_benchmark.py --config configs/experiments/amazon2014_joint.yaml --root runs/bench-item \\
        --variants domain_user dense sasrec
    python tools/run_benchmark.py --config configs/experiments/amazon2014_joint.yaml --root runs/bench-item \\
        --variants popularity --seeds 0
    python tools/run_benchmark.py --config configs/experiments/amazon2014_prior.yaml --root runs/bench-item \\
        --scopes per_service --variants domain_user
    # the same tables on one GPU machine, fp32 as on the CPU, all 9 runs at once, stopped after 9 minutes
    python tools/run_benchmark.py --config configs/experiments/amazon2014_joint.yaml --root runs/bench-item \\
        --variants domain_user dense sasrec --jobs 9 --time-limit 540 train.precision=fp32
    # small CPU run on synthetic data
    python tools/run_benchmark.py train.max_steps=300 --config configs/experiments/demo.yaml \\
        --root runs/bench-demo --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moe_rec.config import load_config
from moe_rec.experiment import ExperimentConfig
from moe_rec.stages import STAMP_FILE

VARIANTS = {
    "dense": ["model.dense=true"],
    "token": ["model.router_mode=token"],
    "domain": ["model.router_mode=domain"],
    "domain_user": ["model.router_mode=domain_user"],
}
BASELINES = ("sasrec", "popularity")  # evaluated with `moe-rec eval --baseline`, nothing trained here
DEFAULT_SCOPES, DEFAULT_SEEDS = ["joint"], [0, 1, 2]
SHARED = ("data", "sids", "sequences")  # built once per scope, linked into each run
COLUMNS = ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20")


def _moe_rec(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from moe_rec.cli import main; sys.exit(main())", *args]


class StepFailed(Exception):
    """A step exited non-zero (the message names its log and ends with the log's last lines)."""


class OutOfTime(Exception):
    """The ``--time-limit`` passed before or during a step; a stopped training resumes on the next call."""


def _run(cmd: list[str], log: Path, deadline: float = math.inf) -> None:
    """Run one step; its output is appended to ``log`` (a resumed run keeps the log of the part
    before), after a line naming the command. A step still running at ``deadline`` (a
    ``time.monotonic()`` value) is stopped: SIGTERM, then SIGKILL after 30 s."""
    if time.monotonic() >= deadline:
        raise OutOfTime
    log.parent.mkdir(parents=True, exist_ok=True)
    line = shlex.join(cmd)
    print(f"  $ {line}", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"==> {time.strftime('%Y-%m-%d %H:%M:%S')} $ {line}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=None if math.isinf(deadline) else max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            f.write(f"==> {time.strftime('%Y-%m-%d %H:%M:%S')} stopped at the time limit\n")
            raise OutOfTime from None
        except BaseException:  # Ctrl-C or another run's failure: leave no orphan behind
            proc.kill()
            proc.wait()
            raise
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise StepFailed(f"step failed (exit {code}); log {log}:\n{tail}")
    print(f"    done in {time.perf_counter() - t0:.0f}s", flush=True)


def prepare_scope(config: str, scope_dir: Path, overrides: list[str], deadline: float = math.inf) -> None:
    """data prepare -> sids build -> sequences build into ``scope_dir``. A step whose output holds
    its stage stamp (written last, so only by a finished step) is skipped until one step runs:
    every step after that runs too. So a stopped preparation resumes at its step, and a scope
    brought elsewhere without its sequences (the largest part) builds only them. The matrix
    compares models on the plain task: critiques stay off unless an override turns them on (then
    they are built after the data)."""
    base = ["--config", config, f"run_dir={scope_dir}", "critiques.enabled=false", *overrides]
    critiques = [(["critiques", "build"], "critiques")] if "critiques.enabled=true" in overrides else []
    steps = [
        (["data", "prepare"], "data"),
        *critiques,
        (["sids", "build"], "sids"),
        (["sequences", "build"], "sequences"),
    ]
    rerun = False
    for step, out in steps:
        rerun = rerun or not (scope_dir / out / STAMP_FILE).exists()
        if rerun:
            _run(_moe_rec(*step, *base), scope_dir / "logs" / f"{'_'.join(step)}.log", deadline)


def run_one(
    config: str,
    scope_dir: Path,
    variant: str,
    seed: int,
    overrides: list[str],
    launch: str | None,
    deadline: float = math.inf,
) -> None:
    """Train one (variant, seed) on a prepared scope, evaluate its best checkpoint on test; a
    baseline variant is trained (SASRec) and evaluated by ``moe-rec eval --baseline``."""
    run_dir = scope_dir / f"{variant}-seed{seed}"
    report = run_dir / "eval" / "test-best.json"
    if report.exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        link = run_dir / name
        if not link.exists():
            link.symlink_to(Path("..") / name)
    if variant in BASELINES:
        args = [f"run_dir={run_dir}", *([f"sasrec.seed={seed}"] if variant == "sasrec" else []), *overrides]
        cmd = _moe_rec("eval", "--config", config, "--baseline", variant, *args)
        _run(cmd, run_dir / "logs" / "eval.log", deadline)
        (run_dir / "eval" / f"test-{variant}.json").replace(report)
    else:
        args = [f"run_dir={run_dir}", *VARIANTS[variant], f"train.seed={seed}", *overrides]
        if launch:
            train_cmd = [*shlex.split(launch), config, *args]
        else:
            train_cmd = [sys.executable, "-m", "moe_rec.train", "--config", config, *args]
        _run(train_cmd, run_dir / "logs" / "train.log", deadline)
        _run(
            _moe_rec("eval", "--config", config, "--checkpoint", "best", *args),
            run_dir / "logs" / "eval.log",
            deadline,
        )
        tag = (run_dir / "checkpoints" / "best").read_text().strip()
        (run_dir / "eval" / f"test-{tag}.json").replace(report)


def finished_runs(root: Path) -> dict[tuple[str, str], dict[int, dict]]:
    """Test metrics of every finished run under ``root``: {(scope, variant): {seed: metrics}}, scopes
    ``joint`` first then by name, variants in ``VARIANTS`` order, seeds ascending."""
    found: dict[tuple[str, str], dict[int, dict]] = {}
    for report in root.glob("*/*-seed*/eval/test-best.json"):
        variant, _, seed = report.parents[1].name.rpartition("-seed")
        if variant in (*VARIANTS, *BASELINES) and seed.isdigit():
            try:
                metrics = json.loads(report.read_text())["metrics"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                sys.exit(f"{report}: not an eval report ({e!r}); rerun that run's eval or remove the file")
            found.setdefault((report.parents[2].name, variant), {})[int(seed)] = metrics
    order = [*VARIANTS, *BASELINES]
    keys = sorted(found, key=lambda k: (k[0] != "joint", k[0], order.index(k[1])))
    return {k: dict(sorted(found[k].items())) for k in keys}


def summarise(results: dict[tuple[str, str], dict[int, dict]]) -> tuple[str, dict]:
    """Markdown table (mean ± std over seeds, per service) and the same numbers as JSON:
    {scope: {variant: {"seeds": [...], "services": {service: {metric: {mean, std, values}}}}}}."""
    lines = ["| scope | variant | service | seeds | " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "---|" * (4 + len(COLUMNS)))
    out: dict = {}
    for (scope, variant), by_seed in results.items():
        runs = list(by_seed.values())
        seeds = " ".join(map(str, by_seed))
        row = out.setdefault(scope, {})[variant] = {"seeds": list(by_seed), "services": {}}
        services = sorted(
            {k.split("/")[1] for r in runs for k in r if k.count("/") == 2 and "macro" not in k}
        )
        for service in [*services, "overall"]:
            prefix = "test/" if service == "overall" else f"test/{service}/"
            cells = []
            for col in COLUMNS:
                values = [r[prefix + col] for r in runs if prefix + col in r]
                mean = statistics.fmean(values)
                std = statistics.stdev(values) if len(values) > 1 else math.nan
                row["services"].setdefault(service, {})[col] = {"mean": mean, "std": std, "values": values}
                cells.append(f"{mean:.4f} ± {std:.4f}" if not math.isnan(std) else f"{mean:.4f}")
            lines.append(f"| {scope} | {variant} | {service} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", help="experiment YAML (data, SIDs, model, training)")
    parser.add_argument("--root", required=True, type=Path, help="directory for every scope and run")
    parser.add_argument(
        "--variants", nargs="+", choices=[*VARIANTS, *BASELINES], help="default: the models, no baseline"
    )
    parser.add_argument("--seeds", nargs="+", type=int, help=f"default: {' '.join(map(str, DEFAULT_SEEDS))}")
    parser.add_argument(
        "--scopes",
        nargs="+",
        help=f"joint, per_service, or service names; default: {' '.join(DEFAULT_SCOPES)}",
    )
    parser.add_argument(
        "--launch", help='training launcher taking CONFIG then overrides, e.g. "launch/cpu.sh 2"'
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once once every scope is prepared (default 1)"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        metavar="SECONDS",
        help="start nothing after this long and stop the steps still running (they resume on the next call)",
    )
    parser.add_argument(
        "--summary-only", action="store_true", help="rewrite the summary of the finished runs; start nothing"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="applied to every step (before the options, or after --)",
    )
    args = parser.parse_args()
    if args.summary_only:
        given = [
            f"--{k}"
            for k in ("config", "variants", "seeds", "scopes", "launch", "time_limit")
            if getattr(args, k)
        ]
        if given or args.overrides:
            parser.error(
                f"--summary-only starts nothing and takes only --root, not {' '.join([*given, *args.overrides])}"
            )
        write_summary(args.root)
        return
    if not args.config:
        parser.error("--config is required (except with --summary-only)")
    args.variants = args.variants or list(VARIANTS)
    args.seeds = args.seeds or DEFAULT_SEEDS
    args.scopes = args.scopes or DEFAULT_SCOPES

    cfg = load_config(ExperimentConfig, args.config, args.overrides)  # fails early on a typo
    scopes: list[str] = []
    for scope in args.scopes:
        if scope == "per_service":
            if not cfg.data.services:
                sys.exit("--scopes per_service needs the services listed: data.services=[a,b,...]")
            scopes += list(cfg.data.services)
        else:
            scopes.append(scope)

    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, not {args.jobs}")
    deadline = math.inf if args.time_limit is None else time.monotonic() + args.time_limit
    runs = []
    try:
        for scope in scopes:
            scope_dir = args.root / scope
            only = [] if scope == "joint" else [f"data.services=[{scope}]"]
            print(f"[{scope}] prepare -> {scope_dir}", flush=True)
            prepare_scope(args.config, scope_dir, [*args.overrides, *only], deadline)
            runs += [(scope, scope_dir, variant, seed, [*args.overrides, *only]) for variant in args.variants
                     for seed in args.seeds]  # fmt: skip
    except (StepFailed, OutOfTime) as e:
        sys.exit(
            str(e) or f"stopped at the time limit ({args.time_limit:.0f}s) while preparing; rerun to resume"
        )

    def one(run: tuple) -> Exception | None:  # None when finished, else what stopped it
        scope, scope_dir, variant, seed, overrides = run
        print(f"[{scope}] {variant} seed {seed}", flush=True)
        try:
            run_one(args.config, scope_dir, variant, seed, overrides, args.launch, deadline)
        except (OutOfTime, StepFailed) as e:
            return e
        return None

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        outcomes = list(pool.map(one, runs))
    if any(finished_runs(args.root)):
        write_summary(args.root)
    for (scope, _, variant, seed, _), stopped in zip(runs, outcomes, strict=True):
        if isinstance(stopped, OutOfTime):
            print(
                f"not finished: [{scope}] {variant} seed {seed}: stopped at the time limit (rerun to resume)"
            )
        elif isinstance(stopped, StepFailed):
            print(f"not finished: [{scope}] {variant} seed {seed}: {stopped}", flush=True)
    if any(isinstance(stopped, StepFailed) for stopped in outcomes):
        sys.exit(1)


def write_summary(root: Path) -> None:
    """``summary.md`` and ``summary.json`` of every finished run under ``root``; the table printed."""
    results = finished_runs(root)
    if not results:
        sys.exit(f"no finished runs under {root} (none has <scope>/<variant>-seed<N>/eval/test-best.json)")
    table, numbers = summarise(results)
    (root / "summary.md").write_text(table)
    (root / "summary.json").write_text(json.dumps(numbers, indent=2) + "\n")
    print(table)
    print(f"wrote {root / 'summary.md'} and summary.json")


if __name__ == "__main__":
    main()
