"""Command lines for the register step and for looking into a registry.

    vlmtune register --model gs://b/runs/7/dpo --evaluation gs://b/runs/7/eval --registry gs://b/registry \\
        --name chart-vlm [--dataset gs://b/runs/7/data] [--no-champion]
    vlmtune registry list    --registry gs://b/registry --name chart-vlm
    vlmtune registry show    --registry gs://b/registry --name chart-vlm --ref champion
    vlmtune registry promote --registry gs://b/registry --name chart-vlm --version 3 [--alias champion] \
        [--expect 2|none]

``main`` is the ``register`` entry point, ``registry_main`` the ``registry`` one (the ``vlmtune`` CLI dispatches
to both); both print JSON to stdout. Exit status (as for every vlmtune command, plus 4):

    0  done (registered, and champion when asked; or the registry command did what it was asked)
    2  bad input, reported in one message on stderr: an artifact that does not exist or is not of its kind, a
       registry that cannot be opened or has no such version, or an evaluation whose gate refused the model
    4  registered, but not made champion: the champion is no longer the one the evaluation compared with
       (or, for ``promote``, the alias no longer points where it did / where --expect says). stderr names
       the champion now in place and the one expected; stdout still has the JSON result
    1  a bug

``register`` checks --model, --evaluation and --dataset before it opens the registry. Promotion is
compare-and-set in both commands: ``promote`` moves the alias only if it still points at the version it
pointed at when the command read it (or at ``--expect``), so two people promoting at once cannot both
succeed silently.
Also runnable as ``python -m components.register.cli ...`` (a first word of list/show/promote selects
``registry_main``).
"""
from __future__ import annotations

import argparse
import json
import sys

from components.common.cli import artifact_problems, run_main
from components.common.config import ConfigError
from components.common.registry import CHAMPION, RegistryError, open_registry
from components.common.schema import DATASET_KIND, EVAL_KIND, MODEL_KIND
from components.register import core


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtune register", description="Register an evaluated model version.")
    p.add_argument("--model", required=True, help="model artifact folder (local or gs://) with a vlmtune.model manifest")
    p.add_argument("--evaluation", required=True, help="evaluation artifact folder; its gate must have passed")
    p.add_argument("--registry", required=True,
                   help="folder, gs:// prefix, vertex://projects/P/locations/L or kubeflow://HOST:PORT")
    p.add_argument("--name", required=True, help="registered model name, e.g. chart-vlm")
    p.add_argument("--dataset", default=None, help="dataset artifact the model was trained on (for lineage)")
    p.add_argument("--no-champion", dest="make_champion", action="store_false",
                   help="register without moving the champion alias")
    return p


def _add_registry_commands(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="command", required=True)
    for command, help_text in (("list", "all versions of a model"), ("show", "one version"),
                               ("promote", "point an alias (default: champion) at a version")):
        s = sub.add_parser(command, help=help_text)
        s.add_argument("--registry", required=True, help="registry URI (see `vlmtune register --help`)")
        s.add_argument("--name", required=True, help="registered model name")
        if command == "show":
            s.add_argument("--ref", default=CHAMPION, help="version number, latest, champion or another alias")
        if command == "promote":
            s.add_argument("--version", type=int, required=True, help="version number to promote")
            s.add_argument("--alias", default=CHAMPION, help="alias to move (default: champion)")
            s.add_argument("--expect", default=None, metavar="VERSION|none",
                           help="move the alias only if it points at this version now ('none': at no version); "
                                "default: where it pointed when the command started")


def make_registry_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtune registry", description="Look into a model registry.")
    _add_registry_commands(p)
    return p


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)

    def body() -> int:
        problems = artifact_problems([("--model", args.model, MODEL_KIND), ("--evaluation", args.evaluation, EVAL_KIND),
                                      ("--dataset", args.dataset, DATASET_KIND)])
        if problems:
            raise ConfigError(problems=problems, title="invalid input")
        result = core.run(args.model, args.evaluation, args.registry, args.name,
                          dataset_uri=args.dataset, make_champion=args.make_champion)
        _print(result)
        if result["reason"]:
            print(f"vlmtune register: {result['reason']}", file=sys.stderr)
            return core.EXIT_NOT_PROMOTED
        return 0

    return run_main(body, prefix="vlmtune register")


def _expected(text: str | None) -> int | None:
    if str(text).strip().lower() == "none":
        return None
    try:
        return int(str(text).strip().lstrip("v"))
    except ValueError:
        raise RegistryError(f"--expect {text!r} is not a version number or 'none'") from None


def registry_main(argv: list[str] | None = None) -> int:
    return run_registry_command(make_registry_parser().parse_args(argv))


def run_registry_command(args: argparse.Namespace) -> int:
    def body() -> int:
        reg = open_registry(args.registry)
        if args.command == "list":
            _print([v.to_dict() for v in reg.list_versions(args.name)])
        elif args.command == "show":
            version = reg.get(args.name, args.ref)
            if version is None:
                raise RegistryError(f"{args.registry} has no version {args.ref!r} of {args.name!r}")
            _print(version.to_dict())
        else:
            if args.expect is not None:
                expected = _expected(args.expect)
            else:
                holder = reg.get(args.name, args.alias)
                expected = holder.version if holder else None
            promotion = reg.promote(args.name, args.version, expected=expected, alias=args.alias)
            _print(reg.get(args.name, args.version).to_dict())
            if not promotion.promoted:
                def shown(v):
                    return "no version" if v is None else f"version {v}"
                print(f"vlmtune registry: did not point {args.alias!r} of {args.name!r} at version {args.version}: it "
                      f"was expected to point at {shown(promotion.expected)}, but points at "
                      f"{shown(promotion.current)} now (someone moved it meanwhile). Check with `vlmtune registry "
                      f"show --registry {args.registry} --name {args.name} --ref {args.alias}` and promote again "
                      f"(--expect {promotion.current if promotion.current is not None else 'none'}) if you still "
                      f"want to.", file=sys.stderr)
                return core.EXIT_NOT_PROMOTED
        return 0

    return run_main(body, prefix="vlmtune registry")


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(registry_main(argv) if argv[:1] and argv[0] in ("list", "show", "promote") else main(argv))
