"""The ``remap`` command: a thin shell over the Python API.

Exit codes: 0 loaded (or planned) as declared; 1 a check failed; 2 bad rules or usage;
3 unreadable source or target; 4 internal error (a bug); 130 interrupted.

>>> main(["validate", "--help"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, TextIO

from . import __version__
from .errors import CheckError, RemapError, UsageError
from .report.grouping import printable, printable_lines

__all__ = ["main"]


EXIT_CODES = {
    0: "loaded (or planned, with --dry-run) as declared",
    1: "a check failed: nothing was loaded (or --verify failed); the report says why",
    2: "bad rules or usage",
    3: "unreadable source or target",
    4: "internal error: a bug in remap, please report it",
}


def _epilog(codes: Sequence[int], examples: Sequence[str]) -> str:
    """The ``exit codes:`` and ``examples:`` sections printed under a command's help."""
    lines = ["exit codes:", *(f"  {code}  {EXIT_CODES[code]}" for code in codes), "", "examples:"]
    return "\n".join([*lines, *(f"  {example}" for example in examples)])


class _ArgumentError(UsageError):
    """argparse's complaint; ``usage`` is the usage line of the (sub)command it concerns."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(f"{message}\n{usage}")
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so main() owns every exit code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> NoReturn:
        raise _ArgumentError(message, self.format_usage().strip())


_FACTORY_HELP = "module.path:callable factory (e.g. torchvision.models:resnet50)"
_KEY_HELP = "where the weights sit inside a checkpoint dict (a.b for nested; default: auto-detected)"
_TRUST_HELP = "unpickle with weights_only=False: runs code from the file (only for files you trust)"
_LINKS_HELP = ("read shards that symbolic links place outside the index's folder (a Hugging Face cache's links "
               "into its blobs/ need no flag)")


def _parser() -> _Parser:
    p = _Parser(
        prog="remap",
        description="Selective and transfer loading of PyTorch weights from a rules file: strict=False without silent failure.",
        epilog=_epilog(
            [0, 1, 2, 3, 4],
            [
                "remap inspect checkpoints/resnet50.pth",
                "remap diff vit.safetensors torchvision.models:vit_b_16 --write rules.yaml",
                "remap apply configs/torchvision-resnet-finetune.yaml --source checkpoints/resnet50.pth",
                "remap COMMAND --help         (each command's options)",
            ],
        ),
    )
    p.add_argument("--version", action="version", version=f"remap {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser,
                           help="one of the commands below (remap COMMAND --help shows its options)")  # fmt: skip
    sub.required = True

    a = sub.add_parser(
        "apply",
        help="plan, check and load a rules file; print the report",
        description="Plan the load from names, shapes and dtypes, check it, then load and freeze. Without --save the "
                    "loaded model ends with the process: apply checks the load; --save writes what was loaded.",
        epilog=_epilog([0, 1, 2, 3, 4], [
            "remap apply rules.yaml --source ckpt.pth --dry-run",
            "remap apply rules.yaml --source ckpt.pth --target torchvision.models:resnet50 \\\n"
            "        --target-kwargs '{\"num_classes\": 10}' --save out.safetensors",
        ]),
    )  # fmt: skip
    a.add_argument("rules", metavar="RULES.yaml", help="the rules file (remap validate checks it alone)")
    a.add_argument("--source", metavar="PATH", action="append", help="checkpoint file or folder, or hf://org/name[@revision] from the local Hugging Face cache (overrides source in the rules); "
                                                                     "NAME=PATH (repeatable) gives a named source of several (overrides that one of the rules' sources)")
    a.add_argument("--target", metavar="MODULE:CALLABLE", help=f"target {_FACTORY_HELP}; overrides target.model")
    a.add_argument("--target-args", metavar="JSON", help="positional arguments for the target factory, a JSON list "
                                                         "(replaces target.args), e.g. '[\"resnet18\"]'")  # fmt: skip
    a.add_argument("--target-kwargs", metavar="JSON", help="keyword arguments for the target factory, a JSON object "
                                                           "(replaces target.kwargs), e.g. '{\"num_classes\": 10}'")  # fmt: skip
    a.add_argument("--key", metavar="A.B", help=_KEY_HELP)
    a.add_argument("--trust-pickle", action="store_true", help=_TRUST_HELP)
    a.add_argument("--trust-links", action="store_true", help=_LINKS_HELP)
    a.add_argument("--dry-run", action="store_true", help="plan and check only: read no tensor, touch no module")
    a.add_argument("--report", metavar="FILE", help="write the JSON report here")
    a.add_argument("--save", metavar="FILE", help="write the loaded state_dict here: .safetensors, or .pt/.pth/.bin/.ckpt for torch.save; the keys of the plain architecture")
    a.add_argument("--max-shard-size", metavar="SIZE", help="shard --save above this size (e.g. 5GB), with an index")
    a.add_argument("--mmap-weights", action="store_true",
                   help="meta-device target (target.device: meta) only: keep the file's pages as the weights, copying "
                        "nothing (for converting with --save); the checkpoint must not change while remap runs")  # fmt: skip
    a.add_argument("--no-rollback", action="store_true",
                   help="skip the host copy that puts an allocated target back if the load fails midway (a file truncated "
                        "meanwhile, an I/O error, Ctrl-C); such a failure may then leave the module partly loaded")  # fmt: skip
    a.add_argument("--json", action="store_true", help="print the JSON report instead of the table (a JSON error object on errors)")
    a.add_argument("--verify", action="store_true", help="after loading, compare source and target outputs (rules' verify section)")
    a.add_argument("--explain", metavar="KEY", action="append", default=[], help="print the journey of a key (repeatable)")
    a.add_argument("-v", "--verbose", action="store_true", help="show every key group")
    a.add_argument("-q", "--quiet", action="store_true", help="print no report: only errors, each failed check's reason and the verdict")

    v = sub.add_parser("validate", help="check a rules file without loading anything",
                       epilog=_epilog([0, 2, 4], ["remap validate rules.yaml", "remap validate rules.yaml --json"]))  # fmt: skip
    v.add_argument("rules", metavar="RULES.yaml", help="the rules file to check")
    v.add_argument("--json", action="store_true", help="print the result as JSON (a JSON error object on errors)")

    i = sub.add_parser(
        "inspect",
        help="keys, shapes, dtypes and parameter counts of a checkpoint, as a tree",
        epilog=_epilog([0, 2, 3, 4], [
            "remap inspect ckpt.pth --depth 2",
            "remap inspect ckpt.pth --flat | grep layer1",
            "remap inspect torchvision.models:resnet18 --json",
        ]),
    )  # fmt: skip
    i.add_argument("checkpoint", metavar="CHECKPOINT", help=f"checkpoint file or folder, hf://org/name[@revision] from the local Hugging Face cache, or a {_FACTORY_HELP}")
    i.add_argument("--key", metavar="A.B", help=_KEY_HELP)
    i.add_argument("--trust-pickle", action="store_true", help=_TRUST_HELP)
    i.add_argument("--trust-links", action="store_true", help=_LINKS_HELP)
    shown = i.add_mutually_exclusive_group()
    shown.add_argument("--depth", type=int, default=None, help="show the tree down to this depth")
    shown.add_argument("--flat", action="store_true", help="list every real key (key, shape, dtype per line) instead of the tree")
    i.add_argument("--json", action="store_true", help="print JSON: the real, flat keys with shape, dtype and numel")

    d = sub.add_parser(
        "diff",
        help="how two key sets line up, and the rules that would join them",
        epilog=_epilog([0, 2, 3, 4], [
            "remap diff vit.safetensors torchvision.models:vit_b_16 --write rules.yaml",
            "remap diff ckpt.pth torchvision.models:resnet50 --target-kwargs '{\"num_classes\": 10}' --json",
        ]),
    )  # fmt: skip
    d.add_argument("source", metavar="SOURCE", help="checkpoint file or folder (or a module.path:callable factory)")
    d.add_argument("target", metavar="TARGET", help="module.path:callable factory (built on the meta device) or a checkpoint")
    d.add_argument("--key", "--source-key", dest="source_key", metavar="A.B",
                   help="where the weights sit inside the source checkpoint dict (--source-key is an old alias)")  # fmt: skip
    d.add_argument("--trust-pickle", action="store_true", help=_TRUST_HELP)
    d.add_argument("--trust-links", action="store_true", help=_LINKS_HELP)
    d.add_argument("--target-args", metavar="JSON", help="positional arguments for the target factory, a JSON list, e.g. '[\"resnet18\"]'")
    d.add_argument("--target-kwargs", metavar="JSON", help='keyword arguments for the target factory, a JSON object, e.g. \'{"num_classes": 10}\'')
    d.add_argument("--write", metavar="RULES.yaml", help="write the rules that reproduce the unambiguous part, for review")
    d.add_argument("--force", action="store_true", help="let --write replace an existing file")
    d.add_argument("--json", action="store_true", help="print the alignment as JSON (a JSON error object on errors)")
    d.add_argument("-v", "--verbose", action="store_true", help="show every row")
    e = sub.add_parser(
        "export",
        help="the rules backwards: a fine-tuned checkpoint in the original's names, shapes, dtypes and layout",
        description="Plan the rules forward from the original (--like) onto the fine-tuned keys, run every op backwards, "
                    "prove the result round-trips (planned forward again it gives the same target keys; every shape and "
                    "dtype is the original's), then write it in the original's format, metadata and shards. Keys the rules "
                    "dropped come from --like unchanged; a slice is written back into --like's tensor, a pad cut off; "
                    "adapt (in_channels, interpolate) keeps --like's tensor unless --allow-lossy. Without --save nothing "
                    "is written: the export is planned, computed and proven.",
        epilog=_epilog([0, 1, 2, 3, 4], [
            "remap export configs/timm-vit-to-torchvision.yaml --from finetuned.pt --like vit.safetensors --save out/vit.safetensors",
            "remap export rules.yaml --from ft.safetensors --like hub/model.safetensors.index.json --save out/ --json",
        ]),
    )  # fmt: skip
    e.add_argument("rules", metavar="RULES.yaml", help="the rules that load the original (--like) into the fine-tuned model")
    e.add_argument("--from", dest="from_", metavar="FINETUNED", required=True,
                   help="the fine-tuned checkpoint, in the target's names (file or folder; or a module.path:callable factory)")  # fmt: skip
    e.add_argument("--like", metavar="ORIGINAL", help="the original checkpoint the rules load from (default: source in the rules)")
    e.add_argument("--save", metavar="OUT", help="write the export here: a file of the original's format, or for a sharded "
                                                 "original a folder or a *.index.json path")  # fmt: skip
    e.add_argument("--only-loaded", action="store_true", help="leave out the original's keys that no target key came from "
                                                             "(default: written unchanged from --like)")  # fmt: skip
    e.add_argument("--allow-lossy", action="store_true", help="where an op cannot be inverted (adapt), compute an approximate "
                                                             "inverse instead of keeping --like's tensor")  # fmt: skip
    e.add_argument("--from-key", metavar="A.B", help="where the weights sit inside the --from checkpoint dict (default: auto-detected)")
    e.add_argument("--like-key", metavar="A.B", help="where the weights sit inside the --like checkpoint dict (default: source.key, else auto-detected)")
    e.add_argument("--trust-pickle", action="store_true", help=_TRUST_HELP)
    e.add_argument("--trust-links", action="store_true", help=_LINKS_HELP)
    e.add_argument("--report", metavar="FILE", help="write the JSON report here")
    e.add_argument("--json", action="store_true", help="print the JSON report instead of the text (a JSON error object on errors)")
    e.add_argument("-v", "--verbose", action="store_true", help="show every key group")
    e.add_argument("-q", "--quiet", action="store_true", help="print no report: only errors, each failed check's reason and the verdict")
    vf = _verify_parser(sub)
    p.commands = {"apply": a, "validate": v, "inspect": i, "diff": d, "export": e, "verify": vf}
    return p


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``; an unknown argument is reported with its subcommand's usage, not the top level's."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code instead of exiting.

    With ``--json`` among the arguments stdout gets one JSON object whatever the outcome:
    the report (or the command's result) on exit 0 and 1, an error object otherwise
    (see :func:`error_object`). remap's own warnings print as one line on stderr.
    """
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    out, err = sys.stdout, sys.stderr
    as_json = "--json" in argv
    args: argparse.Namespace | None = None
    with _clean_warnings(err, trusted="--trust-pickle" in argv), _ranks(argv) as quiet:
        if quiet:  # torchrun: rank 0 prints what every rank agreed on; the others only their own errors
            out = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the command
        try:
            args = _parse(argv)
            return _COMMANDS[args.command](args, out)
        except SystemExit as exc:  # --help and --version
            return int(exc.code or 0)
        except CheckError as exc:
            if quiet and getattr(exc, "agreed", False):
                return exc.exit_code
            _render(exc.report, out, args)
            if getattr(args, "quiet", False) and not as_json:
                _print_failures(exc.report, err)
            print(f"remap: {printable(exc.message.split(chr(10))[0])}", file=err)
            return exc.exit_code
        except RemapError as exc:
            if quiet and getattr(exc, "agreed", False):
                return exc.exit_code  # every rank raised it: rank 0 says it once
            message = _cli_message(exc.message, args)
            who = f"remap [rank {_rank_of_world()}]" if quiet else "remap"  # raised here before the ranks could agree
            print(printable_lines(f"{who}: error: {exc.where + ': ' if exc.where else ''}{message}"), file=err)
            if as_json:
                _print_json(error_object(exc, message), out)
            return exc.exit_code
        except KeyboardInterrupt:
            print("remap: interrupted", file=err)
            if as_json:
                _print_json({"ok": False, "error": {"kind": "Interrupted", "message": "interrupted", "exit_code": 130, "where": None}}, out)
            return 130
        except BrokenPipeError:  # `remap inspect x | head`: the reader left, which is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except Exception as exc:  # a bug: say so, with the traceback that a bug report needs
            import traceback

            traceback.print_exc(file=err)
            bug = "this is a bug in remap; please report it with the command and rules file"
            print(f"remap: internal error: {bug}", file=err)
            if as_json:
                message = f"{type(exc).__name__}: {exc}; {bug}"
                _print_json({"ok": False, "error": {"kind": "InternalError", "message": message, "exit_code": 4, "where": None}}, out)
            return 4


@contextlib.contextmanager
def _ranks(argv: Sequence[str]) -> Iterator[bool]:
    """Under torchrun, ``apply`` runs in a process group of all the ranks (see
    :mod:`remap.loading.process_group`); yields whether this rank stays quiet (not rank 0)."""
    global HARD_EXIT
    if not argv or argv[0] != "apply":
        yield False
        return
    from .loading.process_group import speaks, torchrun_group

    with torchrun_group() as joined:
        HARD_EXIT = HARD_EXIT or joined
        yield joined and not speaks()


def _rank_of_world() -> str:
    """``1 of 4``: this rank in the default process group."""
    import torch.distributed as dist

    return f"{dist.get_rank()} of {dist.get_world_size()}"


#: Set once this process has joined and left a gloo group: ``python -m remap`` then exits with
#: ``os._exit`` after flushing, since gloo's threads can abort interpreter teardown.
HARD_EXIT = False


# ---------------------------------------------------------------------------- the CLI boundary

_FILE_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<column>\d+)$")


def error_object(exc: RemapError, message: str | None = None) -> dict[str, Any]:
    """What ``--json`` prints for an error (exit 2, 3 or 4).

    ``kind`` is the remap error class, ``message`` the text without its location, and
    ``where`` the location as the error knows it (``text``; ``file``/``line``/``column``
    when it is a place in a file), or null. A usage error also carries its ``usage`` line.

    >>> from remap.errors import RulesError
    >>> error_object(RulesError("unknown field 'expcet'", where="r.yaml:4:1"))["error"]["where"]
    {'text': 'r.yaml:4:1', 'file': 'r.yaml', 'line': 4, 'column': 1}
    """
    kind = next(c.__name__ for c in type(exc).__mro__ if c.__module__ == RemapError.__module__)
    text = exc.message if message is None else message
    error: dict[str, Any] = {"kind": kind, "message": text, "exit_code": exc.exit_code, "where": None}
    if isinstance(exc, _ArgumentError):
        error["message"] = text.removesuffix(exc.usage).rstrip("\n")
        error["usage"] = exc.usage
    if exc.where:
        found = _FILE_LINE.match(exc.where)
        error["where"] = {"text": exc.where}
        if found:
            error["where"].update(file=found["file"], line=int(found["line"]), column=int(found["column"]))
    return {"ok": False, "error": error}


def _print_json(data: dict[str, Any], out: TextIO) -> None:
    import json

    print(json.dumps(data, indent=2), file=out)


# The Python API's words, as a command-line user reads them: (pattern, CLI text), in order.
_API_TO_CLI = (
    # "pass a module to remap.load / remap.plan": the API's way in, not the command line's
    (re.compile(r",? or pass (?:a|an|one|the) [^;,.]*? to remap\.\w+(?: / remap\.\w+)?"), ""),
    (re.compile(r"\b(?:pass one|pass a module), (give --)"), r"\1"),
    # "(--verify, verify=True)": the flag alone
    (re.compile(r"\((--[\w-]+), \w+=\w+\)"), r"(\1)"),
    (re.compile(r"remap\.load needs (?:a module|a torch\.nn\.Module) to load into[^;]*(?:; (?:use )?remap\.plan [^;]*)?"),
     "the target factory (--target or target.model) must return a torch.nn.Module to load into"),
    (re.compile(r"this module already has its memory: build it under torch\.device\('meta'\)"),
     "this target already has its memory: set `device: meta` under `target:` in the rules"),
    (re.compile(r"^mmap_weights "), "--mmap-weights "),
    (re.compile(r"^verify was asked for, but"), "--verify was given, but"),
)  # fmt: skip
_KEY_HINT = re.compile(r"with `source\.key`(?: \(e\.g\. `key: ([^`]+)`\))?")


def _cli_message(message: str, args: argparse.Namespace | None) -> str:
    """``message`` in the command line's words: flags, not the Python API's names."""
    for api, cli in _API_TO_CLI:
        message = api.sub(cli, message)
    if args is None:
        return message
    if getattr(args, "key", None) is not None or getattr(args, "source_key", None) is not None:
        return message.replace("source.key ", "--key ").replace("leave `key` out", "leave --key out")
    in_rules = args.command == "apply"

    def hint(found: re.Match[str]) -> str:
        example = found[1] or "A.B"
        return f"with --key {example}" + (f" (or `source.key: {example}` in the rules)" if in_rules else "")

    return _KEY_HINT.sub(hint, message)


def _cli_warning(message: str, *, trusted: bool) -> str:
    """A remap warning in the command line's words."""
    cause = "--trust-pickle is given" if trusted else "source.trust_pickle is set in the rules"
    return message.replace("because trust_pickle is set", f"because {cause}")


@contextlib.contextmanager
def _clean_warnings(err: TextIO, *, trusted: bool) -> Iterator[None]:
    """Show remap's own warnings as ``remap: warning: <message>`` on ``err`` (no source line,
    no category); other libraries' warnings as usual."""
    import os
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:  # fmt: skip
            if os.path.abspath(filename).startswith(package):
                print(printable_lines(f"remap: warning: {_cli_warning(str(message), trusted=trusted)}"), file=err)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _print_failures(report: Any, err: TextIO) -> None:
    """``-q``: each failed check's one-line reason (its message's first line)."""
    for failure in report.failures:
        first = failure.message.split("\n")[0].rstrip().removesuffix(":")
        label = "" if first.startswith(f"{failure.kind}:") else f"{failure.kind}: "
        print(printable(f"remap: {label}{first}"), file=err)


def _apply(args: argparse.Namespace, out: TextIO) -> int:
    from .api import load
    from .rules.parse import load_rules

    if args.target is not None:
        _check_factory_flag(args.target)
    target_args = _json_flag(args.target_args, "--target-args", list, '\'["resnet18"]\'')
    target_kwargs = _json_flag(args.target_kwargs, "--target-kwargs", dict, '\'{"num_classes": 10}\'')
    if args.max_shard_size is not None:
        _check_size_flag(args.max_shard_size)
    rules = load_rules(args.rules)
    source = _source_flags(args.source)
    changes: dict[str, Any] = {}  # the rules' device and dtype still apply
    if args.target:
        changes["model"] = args.target
    if target_args is not None:
        changes["args"] = tuple(target_args)
    if target_kwargs is not None:
        changes["kwargs"] = target_kwargs
    if changes:
        rules = dataclasses.replace(rules, target=dataclasses.replace(rules.target, **changes))
    if args.explain:
        from .api import plan

        p = plan(None, source, rules, key=args.key, trust_pickle=args.trust_pickle or None, trust_links=args.trust_links or None)
        for key in args.explain:  # with --json, stdout is the report alone
            print(printable_lines(p.explain(key)), file=sys.stderr if args.json else out)
    with _progress(enabled=not args.quiet and not args.dry_run and sys.stderr.isatty()) as progress:
        report = load(None, source, rules, dry_run=args.dry_run, key=args.key, trust_pickle=args.trust_pickle or None, trust_links=args.trust_links or None,
                      save=args.save, report=args.report, max_shard_size=args.max_shard_size, progress=progress,
                      verify=args.verify, mmap_weights=args.mmap_weights, rollback=not args.no_rollback)  # fmt: skip
    _render(report, out, args)
    return 0


def _source_flags(values: list[str] | None) -> str | dict[str, str] | None:
    """``--source PATH`` once, or ``--source NAME=PATH`` for each of several named sources (an
    existing path that holds ``=`` stays a path).

    >>> _source_flags(["vision=v.safetensors", "text=t.safetensors"])
    {'vision': 'v.safetensors', 'text': 't.safetensors'}
    """
    import os

    if not values:
        return None
    named: dict[str, str] = {}
    plain: list[str] = []
    for value in values:
        found = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_\-]*)=(.+)", value, flags=re.DOTALL)
        if found is None or os.path.exists(value):
            plain.append(value)
        elif found[1] in named:
            raise UsageError(f"--source {found[1]}=... is given twice ({named[found[1]]!r} and {found[2]!r})")
        else:
            named[found[1]] = found[2]
    if plain and (named or len(plain) > 1):
        raise UsageError(f"--source {plain[-1]!r}: one source is --source PATH, given once; several are each --source NAME=PATH")
    return plain[0] if plain else named


_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".json", ".tar", ".pkl", ".h5", ".npz", ".onnx")


def _check_factory_flag(spec: str) -> None:
    """A checkpoint given as ``--target`` is a usage error that says to use ``--source``.

    A checkpoint is an existing file or folder, a name with a checkpoint suffix, or a
    path (a separator and no ``:``); anything else is left to the factory import.
    """
    import os

    is_path = os.path.exists(spec) or spec.lower().endswith(_CHECKPOINT_SUFFIXES)
    if is_path or (":" not in spec and any(sep and sep in spec for sep in (os.sep, os.altsep, "/"))):
        raise UsageError(f"--target takes a module factory (module.path:callable, e.g. torchvision.models:resnet50); "
                         f"to load the checkpoint {spec!r}, pass it with --source")  # fmt: skip


def _json_flag(text: str | None, flag: str, kind: type, example: str) -> Any:
    """The JSON value of ``flag`` (None when absent); exit 2 unless it is a JSON ``kind``."""
    import json

    if text is None:
        return None
    expected = "a JSON list" if kind is list else "a JSON object"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag}: expected {expected}, e.g. {example}; found {text!r}, which is not JSON ({exc})") from None
    except RecursionError:
        raise UsageError(f"{flag}: expected {expected}, e.g. {example}; found JSON nested deeper than it can be read") from None
    if not isinstance(value, kind):
        raise UsageError(f"{flag}: expected {expected}, e.g. {example}; found {text!r}, a JSON {type(value).__name__}")
    return value


def _check_size_flag(text: str) -> None:
    """``--max-shard-size`` must read as a size; the error names the flag."""
    from .loading.saving import parse_size

    try:
        parse_size(text)
    except UsageError as exc:
        raise UsageError(f"--max-shard-size: {exc.message.removeprefix('max_shard_size: ')}") from None


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
    """The report on ``out``: JSON with --json (even with -q), nothing with -q, else the table."""
    if getattr(args, "json", False):
        print(report.to_json(), file=out)
        return
    if getattr(args, "quiet", False):
        return
    from .report.render import format_report, print_report

    if out.isatty():
        print_report(report, verbose=getattr(args, "verbose", False))
    else:
        print(format_report(report, verbose=getattr(args, "verbose", False)), file=out)


def _validate(args: argparse.Namespace, out: TextIO) -> int:
    from .rules.parse import load_rules

    rules = load_rules(args.rules)
    if args.json:
        steps = [{"index": step.index, "kind": step.kind, "summary": step.summary(), "optional": step.optional, "from": step.reads}
                 for step in rules.steps]  # fmt: skip
        _print_json({"ok": True, "rules": str(args.rules), "version": rules.version, "steps": steps}, out)
        return 0
    print(printable(f"{args.rules}: OK, version {rules.version}, {len(rules.steps)} step(s)"), file=out)
    for step in rules.steps:
        optional = " (optional)" if step.optional else ""
        reads = f" (from {step.reads})" if step.reads else ""
        print(printable(f"  {step.index}. {step.summary()}{reads}{optional}"), file=out)
    return 0


def _inspect(args: argparse.Namespace, out: TextIO) -> int:
    from .sources.readers import open_source
    from .sources.tree import flat_to_dict, format_flat, format_tree, inspect_source

    with open_source(args.checkpoint, key=args.key, trust_pickle=args.trust_pickle, trust_links=args.trust_links) as src:
        tree = inspect_source(src)
    if args.json:  # always the real keys: folding is for people
        _print_json(flat_to_dict(tree), out)
    elif args.flat:
        print(format_flat(tree), file=out)
    else:
        print(format_tree(tree, max_depth=args.depth), file=out)
    return 0


def _diff(args: argparse.Namespace, out: TextIO) -> int:
    import json

    from .diffing.alignment import diff

    target_args = _json_flag(args.target_args, "--target-args", list, '\'["resnet18"]\'') or []
    kwargs = _json_flag(args.target_kwargs, "--target-kwargs", dict, '\'{"num_classes": 10}\'')
    alignment = diff(args.source, args.target, source_key=args.source_key, trust_pickle=args.trust_pickle, trust_links=args.trust_links,
                     target_args=target_args, target_kwargs=kwargs)  # fmt: skip
    draft = None
    if args.write:
        from .diffing.draft import write_draft

        draft = write_draft(alignment, args.write, force=args.force)
    if args.json:
        written = {"path": args.write, "summary": draft.summary()} if draft else None
        print(json.dumps({**alignment.to_dict(), "written": written}, indent=2), file=out)
        return 0
    from .diffing.render import format_alignment, print_alignment

    if out.isatty():
        print_alignment(alignment, verbose=args.verbose)
    else:
        print(format_alignment(alignment, verbose=args.verbose), file=out)
    if draft:
        print(printable_lines(f"\nwrote {args.write}: {draft.summary()}"), file=out)
        print(printable(f"review every line, then: remap apply {args.write}"), file=out)
    return 0


def _export(args: argparse.Namespace, out: TextIO) -> int:
    from .api import export
    from .exporting.report import format_export

    def render(report: Any) -> None:
        if args.json:
            print(report.to_json(), file=out)
        elif not args.quiet:
            print(format_export(report, verbose=args.verbose), file=out)

    try:
        report = export(args.from_, args.rules, like=args.like, save=args.save, report=args.report, only_loaded=args.only_loaded,
                        allow_lossy=args.allow_lossy, key=args.from_key, like_key=args.like_key,
                        trust_pickle=args.trust_pickle or None, trust_links=args.trust_links or None)  # fmt: skip
    except CheckError as exc:  # the export's own report, not a load's
        render(exc.report)
        if args.quiet and not args.json:
            _print_failures(exc.report, sys.stderr)
        print(f"remap: {printable(exc.message.split(chr(10))[0])}", file=sys.stderr)
        return exc.exit_code
    except RemapError as exc:
        found = _KEY_HINT.search(exc.message)
        if found is None:
            raise
        flag = "--from-key" if exc.where is not None and exc.where == str(args.from_) else "--like-key"  # which file wants a key
        raise type(exc)(_KEY_HINT.sub(f"with {flag} {found[1] or 'A.B'}", exc.message), where=exc.where) from None
    render(report)
    return 0


_COMMANDS = {"apply": _apply, "validate": _validate, "inspect": _inspect, "diff": _diff, "export": _export}


# ---------------------------------------------------------------------------- remap verify

VERIFY_EXIT_CODES = {0: "the outputs agree (or --record wrote the reference)", 1: "the outputs differ, or the check is inconclusive",
                     2: "bad rules or usage", 3: "unreadable source, target or reference", 4: EXIT_CODES[4]}  # fmt: skip


def _verify_parser(sub: Any) -> argparse.ArgumentParser:
    """``remap verify``: prove a conversion after the fact, compare two models, or record a reference."""
    codes = "\n".join(f"  {code}  {text}" for code, text in VERIFY_EXIT_CODES.items())
    examples = [
        "remap verify rules.yaml                                  (target.model from output.save, against the source model)",
        "remap verify rules.yaml --record ref.safetensors         (the source model's outputs on the verify input)",
        "remap verify rules.yaml --reference ref.safetensors --target-weights converted.safetensors",
        "remap verify --source-model timm:create_model --source-args '[\"resnet18\"]' --source timm.safetensors \\\n"
        "        --target torchvision.models:resnet18 --target-weights tv.safetensors --input 1,3,64,64",
    ]  # fmt: skip
    f = sub.add_parser(
        "verify",
        help="prove a conversion after the fact (or two models, or against recorded outputs); record reference outputs",
        description="Compare the converted target with its source on the same input, without planning or loading again: "
                    "target.model loaded strictly from --target-weights (default: output.save in the rules) against the source "
                    "model (source.model with source.path) or a recorded reference (--reference, verify.reference). "
                    "With --record, run the source model on the verify input and write the inputs and outputs to a reference "
                    "file instead (docs/verify.md: recording in Keras, ONNX or JAX).",
        epilog=f"exit codes:\n{codes}\n\nexamples:\n" + "\n".join(f"  {x}" for x in examples),
    )  # fmt: skip
    f.add_argument("rules", metavar="RULES.yaml", nargs="?", help="the rules file (optional when the flags say everything)")
    f.add_argument("--record", metavar="REF", help="write the source model's inputs and outputs here (.safetensors) instead of comparing")
    f.add_argument("--reference", metavar="REF", help="compare with this recorded reference instead of the source model (overrides verify.reference)")
    f.add_argument("--source", metavar="PATH", help="the source checkpoint (overrides source.path)")
    f.add_argument("--source-model", metavar="MODULE:CALLABLE", help=f"source architecture, {_FACTORY_HELP}; overrides source.model")
    f.add_argument("--source-args", metavar="JSON", help="positional arguments for the source factory, a JSON list")
    f.add_argument("--source-kwargs", metavar="JSON", help="keyword arguments for the source factory, a JSON object")
    f.add_argument("--target", metavar="MODULE:CALLABLE", help=f"target {_FACTORY_HELP}; overrides target.model")
    f.add_argument("--target-args", metavar="JSON", help="positional arguments for the target factory, a JSON list")
    f.add_argument("--target-kwargs", metavar="JSON", help="keyword arguments for the target factory, a JSON object")
    f.add_argument("--target-weights", metavar="FILE", help="the converted weights, loaded strictly into the target (default: output.save)")
    f.add_argument("--input", metavar="SHAPE", help="the verify input: a shape such as 1,3,224,224, or JSON as verify.input takes "
                                                   "(e.g. '{\"ids\": [1, 16], \"high\": 1000}'); overrides verify.input")  # fmt: skip
    f.add_argument("--output", metavar="SELECTOR", help="which part of the outputs to compare (logits, 0, hidden_states.2); overrides verify.output")
    f.add_argument("--atol", metavar="X", type=float, help="absolute tolerance (overrides verify.atol)")
    f.add_argument("--rtol", metavar="X", type=float, help="relative tolerance (overrides verify.rtol)")
    f.add_argument("--seed", metavar="N", type=int, help="seed of the verify input (overrides verify.seed)")
    f.add_argument("--key", metavar="A.B", help=_KEY_HELP)
    f.add_argument("--trust-pickle", action="store_true", help=_TRUST_HELP)
    f.add_argument("--trust-links", action="store_true", help=_LINKS_HELP)
    f.add_argument("--json", action="store_true", help="print the result as JSON (a JSON error object on errors)")
    return f


def _verify_rules(args: argparse.Namespace) -> Any:
    """The rules file (or empty rules) with the command line's overrides."""
    import os

    from .rules.parse import Rules, load_rules, parse_rules

    rules = load_rules(args.rules) if args.rules is not None else Rules()
    for flag in (args.source_model, args.target):
        if flag is not None:
            _check_factory_flag(flag)
    for side, model, flags in (("source", args.source_model, ("--source-args", "--source-kwargs")),
                               ("target", args.target, ("--target-args", "--target-kwargs"))):  # fmt: skip
        changes: dict[str, Any] = {"model": model} if model is not None else {}
        given = _json_flag(getattr(args, f"{side}_args"), flags[0], list, '\'["resnet18"]\'')
        kwargs = _json_flag(getattr(args, f"{side}_kwargs"), flags[1], dict, '\'{"num_classes": 10}\'')
        changes.update({"args": tuple(given)} if given is not None else {})
        changes.update({"kwargs": kwargs} if kwargs is not None else {})
        if changes:
            rules = dataclasses.replace(rules, **{side: dataclasses.replace(getattr(rules, side), **changes)})
    section = dict(rules.verify.raw) if rules.verify is not None else {}
    overrides = {"input": _input_flag(args.input), "output": args.output, "atol": args.atol, "rtol": args.rtol, "seed": args.seed}
    section.update({k: v for k, v in overrides.items() if v is not None})
    if "seed" in section and args.seed is not None:
        section.pop("seeds", None)
    if args.reference is not None and section and "input" not in section:
        section["reference"] = os.path.abspath(args.reference)  # the flag's path, relative to the working directory
    if section != (dict(rules.verify.raw) if rules.verify is not None else {}):
        rules = dataclasses.replace(rules, verify=parse_rules({"version": 1, "verify": section}, filename="the command line").verify)
    return rules


def _input_flag(text: str | None) -> Any:
    """``--input``: ``1,3,224,224`` (a shape) or the JSON of a ``verify.input`` value."""
    import json

    if text is None:
        return None
    if text.lstrip().startswith(("[", "{")):
        try:
            return json.loads(text)
        except RecursionError:
            raise UsageError(f"--input: the JSON is nested deeper than it can be read; expected a shape such as 1,3,224,224 or "
                             "JSON such as '{\"ids\": [1, 16], \"high\": 1000}'") from None  # fmt: skip
        except json.JSONDecodeError as exc:
            raise UsageError(f"--input: {text!r} is not JSON ({exc}); expected a shape such as 1,3,224,224 or JSON such as "
                             "'{\"ids\": [1, 16], \"high\": 1000}'") from None  # fmt: skip
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise UsageError(f"--input: expected a shape such as 1,3,224,224 (whole numbers separated by commas) or JSON such as "
                         f"'{{\"ids\": [1, 16], \"high\": 1000}}'; found {text!r}")  # fmt: skip
    return [int(p) for p in parts]


def _verify(args: argparse.Namespace, out: TextIO) -> int:
    from .api import verify

    rules = _verify_rules(args)
    result = verify(rules, record=args.record, reference=args.reference, source=args.source, target_weights=args.target_weights,
                    key=args.key, trust_pickle=args.trust_pickle or None, trust_links=args.trust_links or None)  # fmt: skip
    if args.record is not None:
        if args.json:
            _print_json({"ok": True, **result}, out)
        else:
            print(printable_lines(_recorded_text(result)), file=out)
        return 0
    outcome = result.get("outcome", "agree" if result.get("ok") else "differ")
    if args.json:
        _print_json({"ok": outcome == "agree", "verify": result}, out)
    else:
        print(printable_lines(_verify_text(result, outcome)), file=out)
    return 0 if outcome == "agree" else 1


def _recorded_text(result: dict[str, Any]) -> str:
    inputs = ", ".join(f"{name} {shape}" for name, shape in result["inputs"].items())
    outputs = ", ".join(f"{name} {shape}" for name, shape in result["outputs"].items())
    settings = result["settings"]
    lines = [f"recorded {result['recorded']}", f"  inputs   {inputs}", f"  outputs  {outputs}",
             f"  from     {settings.get('model')} ({settings.get('framework')}, seed {settings.get('seed')})"]  # fmt: skip
    return "\n".join(lines)


def _verify_text(result: dict[str, Any], outcome: str) -> str:
    """The report's verify section (its renderer), what it compared against, and a verdict line."""
    from .report.records import Report
    from .report.render import _plain_lines
    from .report.render import _verify as verify_blocks

    lines = _plain_lines(verify_blocks(Report(dry_run=False, verify=result)), 100)
    if not result.get("reference"):  # the renderer names a reference; say what else the target was compared with
        lines.append("  against the source model (source.model with the source weights)")
    if outcome == "agree":
        return "\n".join([*lines, "", "OK: outputs agree"])
    from .verifying.compare import describe_failure

    if outcome == "differ" or not result.get("ok", True):
        return "\n".join([*lines, "", f"FAILED: {describe_failure(result)}"])
    return "\n".join([*lines, "", "INCONCLUSIVE: the outputs agree, but the check cannot vouch for every weight (see above)"])


_COMMANDS["verify"] = _verify
