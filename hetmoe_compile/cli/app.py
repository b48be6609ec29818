"""``hetmoe-compile``: the parser (each command's arguments from its module) and the dispatch: bad input is one line on
stderr and exit code 2, nothing written; Ctrl-C one line and exit 130."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..base.errors import HetMoEError
from ..base.io import check_output_path
from ..base.version import __version__
from . import analyze, calibrate_ranges, evaluate, export, place, run, sweep
from .arguments import EXIT_INTERRUPTED, EXIT_USAGE, _Parser
from .interrupts import interrupted, watching_interrupts
from .options import refuse_unused

COMMANDS = {
    "analyze": analyze,
    "place": place,
    "eval": evaluate,
    "sweep": sweep,
    "calibrate-ranges": calibrate_ranges,
    "export": export,
    "run": run,
}
"""Each command's module: ``add_parser(sub)`` declares its arguments, ``run(args)`` runs it."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hetmoe-compile",
        description="Place the routed experts of an MoE model on digital or analog (AIMC) hardware.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (one line, printed), --help, --version: an exit code, not an exception
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    with watching_interrupts():
        return _dispatch(args)


API_FLAGS = {
    "input_ranges": "--input-ranges",
    "load": "--load",
    "noise_management": "--noise-management",
    "noise_scale": "--noise-scale",
    "t_inference": "--t-inference",
    "w_noise": "--w-noise",
    "w_noise_type": "--w-noise-type",
    "ir_drop": "--ir-drop",
    "bound_management": "--bound-management",
    "routing_tokens": "--routing-tokens",
    "digital_bits": "--digital-bits",
    "group_size": "--group-size",
    "ppl_tokens": "--ppl-tokens",
    "num_fewshot": "--num-fewshot",
    "tasks_dir": "--tasks-dir",
    "instance_seed": "--instance-seed",
    "device_map": "--device-map",
    "max_memory": "--max-memory",
    "offload_folder": "--offload-folder",
    "digital_fraction": "--digital-fraction",
    "ppl_text": "--ppl",
}
"""The Python API's argument names, as the command line spells them: library errors name the argument, and the
CLI shows them as its flags."""


_API_NAME = re.compile(r"(?<![\w.'\"-])(" + "|".join(API_FLAGS) + r")(=(?:'([^']*)'|(\S+)))?(?![\w(])")


FIX_VERBS = ("use ", "give ", "add ", "set ", "drop ", "pass ")
"""Words after which a message's fix names an argument."""


def as_flags(message: str) -> str:
    """``message`` with the API's argument names turned into flags where they name an argument: at the start
    (``input_ranges apply ...``), with a value (``noise_management='constant'`` -> ``--noise-management
    constant``), before a colon (``noise_scale: 2.5 there``) or in the fix (``use device_map alone``); elsewhere a
    name may mean a record's field (``holds instance_seed 5``)."""

    def flag(m: re.Match) -> str:
        value = m.group(3) if m.group(3) is not None else m.group(4)
        named = message[: m.start()].endswith(FIX_VERBS) or message[m.end() : m.end() + 1] == ":"
        if m.start() and value is None and not named:
            return m.group(0)
        return API_FLAGS[m.group(1)] + ("" if value is None else f" {value}")

    return _API_NAME.sub(flag, message)


INPUT_OPTIONS = ("model", "calib", "placement", "ppl", "input_ranges", "cost_config", "tasks_dir", "device_map")
"""The flags that name files or directories a command reads."""


def _check_inputs_survive(args) -> None:
    """No output of the command may replace one of its inputs (:func:`~..base.io.check_inputs_survive`)."""
    from ..base.io import check_inputs_survive

    inputs = {("MODEL" if k == "model" else "--" + k.replace("_", "-")): getattr(args, k, None) for k in INPUT_OPTIONS}
    out = Path(args.out)
    if args.command in ("export", "sweep"):  # the directory is replaced as a whole, or is the sweep's store
        check_inputs_survive(inputs, directories={"--out": out})
        return
    written = {
        "analyze": [out / "scores.json", out / "scores.png"],
        "eval": [out, out.with_suffix(".routing.png"), out.with_suffix(".time.png")],
    }
    check_inputs_survive(inputs, files={"--out": written.get(args.command, [out])})


def _dispatch(args) -> int:
    try:
        refuse_unused(args)
        if getattr(args, "out", None):
            check_output_path(args.out)  # before the model loads: a bad --out costs no work
            _check_inputs_survive(args)
        return COMMANDS[args.command].run(args)
    except (KeyboardInterrupt, Exception) as exc:
        if interrupted(exc):  # outputs are written atomically: an interrupted run leaves nothing behind
            print(f"hetmoe-compile {args.command}: interrupted; nothing was written", file=sys.stderr)
            return EXIT_INTERRUPTED
        if not isinstance(exc, HetMoEError):
            raise
        print(f"hetmoe-compile {args.command}: error: {as_flags(str(exc))}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
