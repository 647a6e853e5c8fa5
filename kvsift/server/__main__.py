"""``python -m kvsift.server [options]`` = ``kvsift serve [options]``."""

import argparse
import sys

from kvsift.cli import run_command
from kvsift.server.cli import add_arguments, run_serve


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvsift.server", description="kvsift's OpenAI-compatible server")
    add_arguments(p)
    args = p.parse_args(argv)
    return run_command(run_serve, args)


if __name__ == "__main__":
    sys.exit(main())
