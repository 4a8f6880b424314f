"""The `pixart` command: one entry point, one module per subcommand."""
from __future__ import annotations

import argparse
import sys

from pixart import __version__
from pixart.cli import (
    bench,
    convert_dit,
    data,
    demo,
    distill,
    evaluate,
    export_diffusers,
    extract_features,
    import_checkpoint,
    launch,
    personalize,
    relabel,
    sample,
    train,
)
from pixart.errors import PixArtError
from pixart.train.preemption import Preempted

COMMANDS = (data, relabel, extract_features, train, launch, distill, convert_dit, import_checkpoint, export_diffusers,
            personalize, sample, bench, evaluate, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixart",
        description="Train, convert and export PixArt-alpha text-to-image diffusion transformers.",
    )
    parser.add_argument("--version", action="version", version=f"pixart {__version__}")
    # The deepspeed launcher inserts --local_rank=N before the command; ranks come from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    _name_own_parsers(parser)
    return parser


def _name_own_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser records itself, so that a misspelt flag gets its usage, not the top level's."""
    parser.set_defaults(own_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _name_own_parsers(child)


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # argparse reports these from the top-level parser: `usage: pixart COMMAND ...`
        args.own_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    name = " ".join(filter(None, (args.command, getattr(args, "job", None))))  # "data sam"
    try:
        status = args.run(args)  # a job that leaves damaged shards to retry returns 1
    except (PixArtError, OSError) as e:  # bad input and unwritable outputs: one line, no traceback
        print(f"pixart {name}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a peer lost outside the training loop (whose own guard names the step)
        from pixart.train.watchdog import lost_peer_line

        line = lost_peer_line(e)
        if line is None:
            raise
        print(f"pixart {name}: error: {line}", file=sys.stderr)
        return 2
    except Preempted as e:  # a scheduler's SIGTERM or SIGUSR1: the last step is saved
        print(f"pixart {name}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C: what is written is whole, and a rerun goes on from it
        print(f"\npixart {name}: interrupted; rerun the same command to go on", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
