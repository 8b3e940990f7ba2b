"""The ``remap`` command: a thin shell over the Python API.

Exit codes: 0 loaded (or planned) as declared; 1 a check failed; 2 bad rules or usage;
3 unreadable source or target; 4 internal error (a bug); 130 interrupted.

>>> main(["validate", "--help"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from . import __version__
from .errors import CheckError, RemapError, UsageError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so main() owns every exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}\n{self.format_usage().strip()}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="remap", description="Selective and transfer loading of PyTorch weights from a rules file.")
    p.add_argument("--version", action="version", version=f"remap {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    a = sub.add_parser("apply", help="plan, check and load a rules file; print the report")
    a.add_argument("rules", metavar="RULES.yaml")
    a.add_argument("--source", metavar="PATH", help="checkpoint file or folder (overrides source in the rules)")
    a.add_argument("--target", metavar="MODULE:CALLABLE", help="target factory (overrides target.model; its args/kwargs still apply)")
    a.add_argument("--key", metavar="A.B", help="where the weights sit inside a checkpoint dict")
    a.add_argument("--trust-pickle", action="store_true", help="unpickle with weights_only=False: runs code from the file")
    a.add_argument("--dry-run", action="store_true", help="plan and check only: read no tensor, touch no module")
    a.add_argument("--report", metavar="FILE", help="write the JSON report here")
    a.add_argument("--save", metavar="FILE", help="write the loaded state_dict here (.safetensors, or .pt/.pth)")
    a.add_argument("--max-shard-size", metavar="SIZE", help="shard --save above this size (e.g. 5GB), with an index")
    a.add_argument("--mmap-weights", action="store_true",
                   help="meta-device target (target.device: meta) only: keep the file's pages as the weights, copying "
                        "nothing (for converting with --save); the checkpoint must not change while remap runs")  # fmt: skip
    a.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    a.add_argument("--verify", action="store_true", help="after loading, compare source and target outputs (rules' verify section)")
    a.add_argument("--explain", metavar="KEY", action="append", default=[], help="print the journey of a key (repeatable)")
    a.add_argument("-v", "--verbose", action="store_true", help="show every key group")
    a.add_argument("-q", "--quiet", action="store_true", help="print only errors")

    v = sub.add_parser("validate", help="check a rules file without loading anything")
    v.add_argument("rules", metavar="RULES.yaml")

    i = sub.add_parser("inspect", help="keys, shapes, dtypes and parameter counts of a checkpoint, as a tree")
    i.add_argument("checkpoint", metavar="CHECKPOINT")
    i.add_argument("--key", metavar="A.B", help="where the weights sit inside a checkpoint dict")
    i.add_argument("--trust-pickle", action="store_true", help="unpickle with weights_only=False: runs code from the file")
    i.add_argument("--depth", type=int, default=None, help="show the tree down to this depth")
    i.add_argument("--json", action="store_true", help="print JSON")

    d = sub.add_parser("diff", help="how two key sets line up, and the rules that would join them")
    d.add_argument("source", metavar="SOURCE", help="checkpoint file or folder (or a module.path:callable factory)")
    d.add_argument("target", metavar="TARGET", help="module.path:callable factory (built on the meta device) or a checkpoint")
    d.add_argument("--source-key", metavar="A.B", help="where the weights sit inside the source checkpoint dict")
    d.add_argument("--trust-pickle", action="store_true", help="unpickle with weights_only=False: runs code from the file")
    d.add_argument("--target-kwargs", metavar="JSON", help='keyword arguments for the target factory, e.g. \'{"num_classes": 10}\'')
    d.add_argument("--write", metavar="RULES.yaml", help="write the rules that reproduce the unambiguous part, for review")
    d.add_argument("--force", action="store_true", help="let --write replace an existing file")
    d.add_argument("--json", action="store_true", help="print the alignment as JSON")
    d.add_argument("-v", "--verbose", action="store_true", help="show every row")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code instead of exiting."""
    out, err = sys.stdout, sys.stderr
    try:
        args = _parser().parse_args(argv)
        return {"apply": _apply, "validate": _validate, "inspect": _inspect, "diff": _diff}[args.command](args, out)
    except SystemExit as exc:  # --help and --version
        return int(exc.code or 0)
    except CheckError as exc:
        _render(exc.report, out, args)
        print(f"remap: {exc.message.splitlines()[0]}", file=err)
        return exc.exit_code
    except RemapError as exc:
        print(f"remap: error: {exc}", file=err)
        return exc.exit_code
    except KeyboardInterrupt:
        print("remap: interrupted", file=err)
        return 130
    except BrokenPipeError:  # `remap inspect x | head`: the reader left, which is fine
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception:  # a bug: say so, with the traceback that a bug report needs
        import traceback

        traceback.print_exc(file=err)
        print("remap: internal error: this is a bug in remap; please report it with the command and rules file", file=err)
        return 4


def _apply(args: argparse.Namespace, out: TextIO) -> int:
    from .api import load
    from .rules import load_rules

    rules = load_rules(args.rules)
    if args.target:  # the model only: the rules' args, kwargs, device and dtype still apply
        rules = dataclasses.replace(rules, target=dataclasses.replace(rules.target, model=args.target))
    if args.explain:
        from .api import plan

        p = plan(None, args.source, rules, key=args.key, trust_pickle=args.trust_pickle or None)
        for key in args.explain:
            print(p.explain(key), file=out)
    with _progress(enabled=not args.quiet and not args.dry_run and sys.stderr.isatty()) as progress:
        report = load(None, args.source, rules, dry_run=args.dry_run, key=args.key, trust_pickle=args.trust_pickle or None,
                      save=args.save, report=args.report, max_shard_size=args.max_shard_size, progress=progress,
                      verify=args.verify, mmap_weights=args.mmap_weights)  # fmt: skip
    _render(report, out, args)
    return 0


class _progress:
    """A progress bar on the terminal for loads that take more than a second; silent otherwise."""

    DELAY = 1.0

    def __init__(self, *, enabled: bool) -> None:
        self.enabled, self.bar, self.task = enabled, None, None

    def __enter__(self) -> Any:
        import time

        self.start = time.monotonic()
        return self.update if self.enabled else None

    def update(self, done: int, total: int, tensors: int, count: int) -> None:
        import time

        if self.bar is None:
            if time.monotonic() - self.start < self.DELAY or done >= total:
                return
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            self.bar = Progress(TextColumn("loading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                TextColumn("{task.fields[tensors]}"), transient=True)  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task("load", total=total, tensors="")
        self.bar.update(self.task, completed=done, tensors=f"{tensors}/{count} tensors")

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _render(report: Any, out: TextIO, args: Any) -> None:
    if getattr(args, "quiet", False):
        return
    if getattr(args, "json", False):
        print(report.to_json(), file=out)
        return
    from .render import format_report, print_report

    if out.isatty():
        print_report(report, verbose=getattr(args, "verbose", False))
    else:
        print(format_report(report, verbose=getattr(args, "verbose", False)), file=out)


def _validate(args: argparse.Namespace, out: TextIO) -> int:
    from .rules import load_rules

    rules = load_rules(args.rules)
    print(f"{args.rules}: OK, version {rules.version}, {len(rules.steps)} step(s)", file=out)
    for step in rules.steps:
        optional = " (optional)" if step.optional else ""
        print(f"  {step.index}. {step.summary()}{optional}", file=out)
    return 0


def _inspect(args: argparse.Namespace, out: TextIO) -> int:
    import json

    from .sources import open_source
    from .tree import format_tree, inspect_source, tree_to_dict

    with open_source(args.checkpoint, key=args.key, trust_pickle=args.trust_pickle) as src:
        tree = inspect_source(src)
    if args.json:
        print(json.dumps(tree_to_dict(tree), indent=2), file=out)
    else:
        print(format_tree(tree, max_depth=args.depth), file=out)
    return 0


def _diff(args: argparse.Namespace, out: TextIO) -> int:
    import json

    from .diff import diff

    kwargs = None
    if args.target_kwargs is not None:
        try:
            kwargs = json.loads(args.target_kwargs)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--target-kwargs: expected a JSON object, e.g. '{{\"num_classes\": 10}}': {exc}") from None
        if not isinstance(kwargs, dict):
            raise UsageError(f"--target-kwargs: expected a JSON object, found {args.target_kwargs!r}")
    alignment = diff(args.source, args.target, source_key=args.source_key, trust_pickle=args.trust_pickle, target_kwargs=kwargs)
    draft = None
    if args.write:
        from .diff_writer import write_draft

        draft = write_draft(alignment, args.write, force=args.force)
    if args.json:
        written = {"path": args.write, "summary": draft.summary()} if draft else None
        print(json.dumps({**alignment.to_dict(), "written": written}, indent=2), file=out)
        return 0
    from .diff_render import format_alignment, print_alignment

    if out.isatty():
        print_alignment(alignment, verbose=args.verbose)
    else:
        print(format_alignment(alignment, verbose=args.verbose), file=out)
    if draft:
        print(f"\nwrote {args.write}: {draft.summary()}", file=out)
        print(f"review every line, then: remap apply {args.write}", file=out)
    return 0
