"""`mnist-pipeline`: the registered models (list, promote, roll back, ensemble, predict) and
the shared tracking server.

    mnist-pipeline models                      # versions, aliases, accuracy, run
    mnist-pipeline promote [--version N | --run-id ID] [--force --reason TEXT]
    mnist-pipeline rollback                    # alias back to the previous champion
    mnist-pipeline history                     # every alias move, oldest first
    mnist-pipeline ensemble --versions 4 5 6   # one model averaging several versions
    mnist-pipeline ensemble --experiments E1 E2  # ... the versions of DVC experiments
    mnist-pipeline predict IMAGE... [--model URI] [--json]
    mnist-pipeline plots-page .dvc/offline-plots.html  # `make install` writes it
    mnist-pipeline build-kernels               # compile the fused CPU kernels (make install)
    mnist-pipeline server [start|status|stop] [--dir .tracking]  # the shared tracking server
    mnist-pipeline migrate --from sqlite:///mlruns/mlflow.db   # a local store into the server

The store is $MLFLOW_TRACKING_URI, else the project's mlruns/ (as the train stage uses it);
relative default paths (params.yaml, models/run.json, data/raw, .tracking) are the project's,
from any folder inside it.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import registry
from .errors import PipelineError, run_stage
from .io import read_json, repo_root
from .params import SECTIONS, alias_problem, load_params, name_problem
from .tracking import git_state, resolve_tracking, sqlite_file, store_client


def _store() -> str:
    return resolve_tracking(os.environ, Path.cwd())[0]


def _client(args: argparse.Namespace) -> Any:
    """The client of the store that holds the registered models: one that exists."""
    uri = _store()
    database = sqlite_file(uri)
    if database is not None and not database.is_file():
        raise PipelineError(f"no MLflow store at {database}: run this in the project's folder "
                            "after `dvc repro`, or set MLFLOW_TRACKING_URI to the store")
    return store_client(uri)


def _check_name(what: str, value: str, problem: str | None) -> None:
    """Refuse `value` (an alias, a model name) that MLflow would refuse, for `problem`."""
    if problem:
        raise PipelineError(f"{what} {value!r}: {problem}")


def _provenance() -> dict[str, str]:
    return {"user": getpass.getuser(), **git_state(Path.cwd())}


def _candidate(client: Any, args: argparse.Namespace, name: str) -> Any:
    if args.version is not None:
        return registry.get_version(client, name, args.version)
    run_id = args.run_id
    if run_id is None:
        path = _in_project(args.run_info)
        if not path.is_file():
            raise PipelineError(f"{path} not found: run the pipeline first, or name "
                                "a --version or --run-id")
        info = read_json(path, keys=("run_id",))
        if info.get("registered_model") == name:
            registry.check_run_info(client, info, _store(), str(path))
            if info.get("version") is not None:
                return registry.get_version(client, name, info["version"])
        run_id = info.get("run_id")
    return registry.version_for_run(client, name, run_id)


def cmd_promote(args: argparse.Namespace) -> int:
    params = _params(args, "promote")
    alias = args.alias or params.alias
    _check_name("alias", alias, alias_problem(alias))
    client = _client(args)
    version = _candidate(client, args, args.name)
    current = registry.champion(client, args.name, alias)
    note = better_note(int(version.version), registry.better_versions(client, args.name, version),
                       None if current is None else int(current.version), params.min_accuracy)
    try:
        entry = registry.promote(client, args.name, alias, version, params.min_accuracy,
                                 force=args.force, reason=args.reason or "",
                                 provenance=_provenance())
    finally:  # promoted or not, say that a more accurate version exists
        if note:
            print(note, file=sys.stderr)
    before = f", replacing version {entry['previous']}" if entry["previous"] else ""
    print(f"{args.name}@{alias} is now version {entry['version']}{before}. Test accuracy "
          f"{entry['test_accuracy']:.4%}. Reason: {entry['reason']}.")
    return 0


def better_note(candidate: int, better: list[tuple[int, float]], holder: int | None,
                floor: float) -> str | None:
    """The note on the most accurate of the `better` (version, accuracy) pairs, best first,
    that the alias does not already point to (`holder`); None if there is none."""
    others = [(number, accuracy) for number, accuracy in better if number != holder]
    if not others:
        return None
    number, accuracy = others[0]
    how = (f"To promote it: mnist-pipeline promote --version {number}" if accuracy >= floor
           else f"It is below the floor {floor:.4%} too: promote refuses it without --force "
                f"(mnist-pipeline promote --version {number} --force --reason ...)")
    return (f"Note: version {number} has a higher test accuracy ({accuracy:.4%}) than "
            f"version {candidate}. {how}")


def cmd_rollback(args: argparse.Namespace) -> int:
    alias = args.alias or _params(args, "promote").alias
    _check_name("alias", alias, alias_problem(alias))
    entry = registry.rollback(_client(args), args.name, alias, _provenance(), args.reason or "")
    print(f"{args.name}@{alias} rolled back from version {entry['previous']} "
          f"to version {entry['version']}")
    return 0


def _json_lines(rows: list[dict[str, Any]]) -> int:
    for row in rows:
        print(json.dumps(row, sort_keys=True))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    entries = registry.history(_client(args), args.name)
    if args.json:
        return _json_lines(entries)
    if not entries:
        print(f"no alias has been moved on {args.name} yet")
    for e in entries:
        print(f"{e['time']}  {e['action']:<8} @{e['alias']} -> v{e['version']} "
              f"(from {('v' + str(e['previous'])) if e['previous'] else 'none'})  "
              f"acc {e['test_accuracy']:.4%}  by {e.get('user', '?')}  {e['reason']}")
    return 0


def _percent(accuracy: float | None) -> str:
    return f"{accuracy:.4%}" if accuracy is not None else "not evaluated"


def cmd_models(args: argparse.Namespace) -> int:
    from .recipes import load_recipes, match_recipe

    if args.recipes is not None and not args.recipes.is_dir():
        raise PipelineError(f"--recipes {args.recipes}: no such folder")
    recipes = load_recipes(args.recipes or _in_project(Path("recipes")))
    rows = registry.list_versions(_client(args), args.name,
                                  lambda params: match_recipe(params, recipes))
    if args.json:
        return _json_lines(rows)
    print(f"{'version':>7}  {'aliases':<10} {'test acc':>8}  {'epochs':>6}  {'recipe':<12} "
          f"{'created (UTC)':<16}  run (DVC experiment)")
    for r in rows:
        acc = f"{r['test_accuracy']:.2%}" if r["test_accuracy"] is not None else "-"
        print(f"{r['version']:>7}  {','.join(r['aliases']) or '-':<10} {acc:>8}  "
              f"{r['epochs'] or '-':>6}  {r['recipe'] or '-':<12} "
              f"{r['created'][:16].replace('T', ' '):<16}  {r['run_name'] or r['run_id']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_files

    if not args.model:
        alias = _params(args, "promote").alias
        args.model = f"models:/{args.name}@{alias}"
    if args.model.startswith(("models:/", "runs:/")):
        _client(args)  # (the store, which must exist, becomes this process's)
    failed = 0
    for row in predict_files(args.model, args.images):
        failed += "error" in row
        if args.json:
            print(json.dumps(row), flush=True)
        elif "error" in row:
            reason = row["error"].removeprefix(f"{row['file']}: ")
            print(f"{row['file']}: error: {reason}", flush=True)
        else:
            print(f"{row['file']}: {row['digit']} ({row['probability']:.1%})", flush=True)
    if failed:
        print(f"{failed} of {len(args.images)} file(s) gave no prediction (see above)",
              file=sys.stderr)
    return 1 if failed else 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from .ensemble import build_ensemble
    from .runtime import tune_cpu_allocator
    from .tracking import MlflowTracker

    tune_cpu_allocator()  # faster CPU inference (the test-set scoring), same numbers

    batch_size = _params(args, "evaluate").batch_size
    target = args.ensemble_name or f"{args.name}-ensemble"
    _check_name("--ensemble-name", target, name_problem(target))
    uri, artifacts = resolve_tracking(os.environ, Path.cwd())
    client = _client(args)
    versions = args.versions or registry.versions_of_experiments(client, args.name,
                                                                  args.experiments)
    result = build_ensemble(MlflowTracker(uri, target, artifacts), args.name, versions,
                            target, _in_project(args.raw), batch_size)
    members = ", ".join(f"v{v} {_percent(a)}" for v, a in zip(versions,
                                                             result["member_accuracy"],
                                                             strict=True))
    print(f"Registered {result['registry_uri']}: test accuracy "
          f"{result['test_accuracy']:.4%} (members: {members})")
    return 0


def cmd_plots_page(args: argparse.Namespace) -> int:
    from .plots_page import SCRIPTS, write_page

    path = write_page(args.output)
    print(f"Wrote {path} ({', '.join(f'{s.package} {s.version}' for s in SCRIPTS)} inline); "
          "`dvc plots show --html-template` with it, or `dvc config --local "
          "plots.html_template`, renders every plot offline")
    return 0


def cmd_build_kernels(args: argparse.Namespace) -> int:
    from .fused_build import build

    done = build()
    for note in done.notes:
        print(f"note: {note}", file=sys.stderr)
    how = f"compiled in {done.seconds:.0f} s" if done.compiled else "cached build"
    if done.problem is not None:
        raise PipelineError(f"fused CPU kernels at {done.path} ({how}) do not work: "
                            f"{done.problem}; training will use the eager modules")
    print(f"fused CPU kernels: {done.path} ({how}); they match the eager modules")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from . import server

    default_root = repo_root(os.environ, Path.cwd()) / server.DEFAULT_DIR
    root = args.dir or default_root
    if args.action == "stop":
        stopped = server.stop(root)
        print(f"stopped {' and '.join(stopped)} of {root}" if stopped
              else f"no server of {root} was running")
        return 0
    if args.action == "status":
        lines, up = server.status_report(root)
        print("\n".join(lines))
        if not up:
            print(f"Start it: {server.server_command('start', root, default_root)}")
        return 0 if up else 3
    hosts = [h.strip() for h in (args.allowed_hosts or "").split(",") if h.strip()]
    found, already = server.start(root, args.host, args.port, hosts, args.postgres_port,
                                  args.workers)
    print(server.start_report(found, already, default_root))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from .migrate import check_stores, migrate

    target, artifacts = resolve_tracking(os.environ, Path.cwd())
    source = check_stores(args.source, target)
    store_client(target)  # a server: reachable, login accepted (else one line, now)
    summary = migrate(source, target, artifacts)
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{source} -> {target}: {summary.line()}")
    return 0


def _add_migrate(sub: Any) -> None:
    help_text = ("Copy a local MLflow store (runs, artifacts, logged and registered models, "
                 "aliases) into $MLFLOW_TRACKING_URI; what an earlier copy brought is skipped.")
    p = sub.add_parser("migrate", help=help_text, description=help_text)
    p.set_defaults(func=cmd_migrate, name="")  # (no registered model involved)
    p.add_argument("--from", dest="source", required=True, metavar="URI",
                   help="the store to copy: sqlite:///path/to/mlruns/mlflow.db")


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return int(text)


def _add_server(sub: Any) -> None:
    help_text = ("Start, check or stop the shared MLflow tracking server (PostgreSQL store, "
                 "basic authentication, proxied artifacts).")
    p = sub.add_parser("server", help=help_text, description=help_text)
    p.set_defaults(func=cmd_server)
    p.add_argument("action", nargs="?", choices=("start", "status", "stop"), default="start",
                   help="start (the default), status or stop")
    p.add_argument("--dir", type=Path,
                   help="the server's folder (default: the project's .tracking/)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface, with --allowed-hosts)")
    p.add_argument("--port", type=_port, default=5000, help="MLflow's port (default 5000)")
    p.add_argument("--allowed-hosts", metavar="NAMES",
                   help="comma-separated host names clients use to reach this machine")
    p.add_argument("--postgres-port", type=_port,
                   help="PostgreSQL's port on 127.0.0.1, fixed on first start (default 5433, "
                        "else a free one)")
    p.add_argument("--workers", type=int, default=4,
                   help="MLflow server worker processes (default 4)")


def parser() -> argparse.ArgumentParser:
    summary = " ".join(__doc__.split("\n\n")[0].split())  # the docstring's first paragraph
    top = argparse.ArgumentParser(prog="mnist-pipeline", description=summary)
    sub = top.add_subparsers(dest="command", required=True)

    def add(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        p.add_argument("--name", default=None,
                       help="registered model (default: train.registered_model in params)")
        p.add_argument("--params", type=Path,
                       help="default: the project's params.yaml (outside a project: the "
                            "built-in defaults)")
        return p

    p = add("promote", cmd_promote, "Move the alias (default champion) to a model version.")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, help="version number to promote")
    which.add_argument("--run-id", help="promote the version registered by this run")
    p.add_argument("--run-info", type=Path, default=Path("models/run.json"),
                   help="default candidate: the version this checkout's pipeline produced")
    p.add_argument("--alias", help="alias to move (default: promote.alias in params)")
    p.add_argument("--force", action="store_true", help="promote past the gate (with --reason)")
    p.add_argument("--reason", help="why; recorded with the promotion")

    p = add("rollback", cmd_rollback, "Move the alias back to the previous champion.")
    p.add_argument("--alias", help="alias to move back (default: promote.alias in params)")
    p.add_argument("--reason", help="why; recorded with the rollback")

    p = add("history", cmd_history, "Print every alias move, oldest first.")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = add("models", cmd_models, "List the versions with their aliases, accuracy and run.")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--recipes", type=Path,
                   help="the recipes to name each version's params by (default: the "
                        "project's recipes/)")

    p = add("ensemble", cmd_ensemble,
            "Register the ensemble (averaged probabilities) of several versions as one model.")
    chosen = p.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--versions", type=int, nargs="+", help="these versions")
    chosen.add_argument("--experiments", nargs="+", metavar="NAME",
                        help="the versions these DVC experiments registered (`make ensemble`)")
    p.add_argument("--ensemble-name", help="registered name (default: <name>-ensemble)")
    p.add_argument("--raw", type=Path, default=Path("data/raw"),
                   help="MNIST IDX folder, for the ensemble's test score (default: the "
                        "project's data/raw)")

    p = add("predict", cmd_predict, "Predict the digit in each image file.")
    p.add_argument("images", nargs="+", type=Path,
                   help="image files (any format Pillow reads), one digit each")
    p.add_argument("--model", help="model URI (default: models:/<name>@<alias>)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    help_text = "Write a `dvc plots show` page template that draws the vega plots offline."
    p = sub.add_parser("plots-page", help=help_text, description=help_text)
    p.set_defaults(func=cmd_plots_page, name="")  # (no registered model involved)
    p.add_argument("output", type=Path, help="the template to write")

    help_text = "Compile the fused CPU training kernels now (else the first training does)."
    p = sub.add_parser("build-kernels", help=help_text, description=help_text)
    p.set_defaults(func=cmd_build_kernels, name="")  # (no registered model involved)

    _add_server(sub)
    _add_migrate(sub)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run_stage(lambda: _run(args))


def _run(args: argparse.Namespace) -> object:
    """The command, with --name defaulting to params.yaml's registered model (a bad
    params.yaml stops it with run_stage's one-line message)."""
    if getattr(args, "name", "") is None:
        args.name = _params(args, "train").registered_model
    return args.func(args)


def _in_project(path: Path) -> Path:
    """A relative default path: in the working folder if it is there, else in the project."""
    if path.is_absolute() or path.exists():
        return path
    return repo_root(os.environ, Path.cwd()) / path


def _params(args: argparse.Namespace, section: str) -> Any:
    """A section of --params; by default of the project's params.yaml (from any folder in
    the project), or outside a project the built-in defaults."""
    if args.params is not None:
        return load_params(args.params, section)
    found = _in_project(Path("params.yaml"))
    return load_params(found, section) if found.is_file() else SECTIONS[section]()
