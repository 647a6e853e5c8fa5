"""``python -m kvsift.server [options]`` = ``kvsift serve [options]``."""

import argparse
import sys

from kvsift.server.cli import add_arguments, run_serve


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvsift.server", description="kvsift's OpenAI-compatible server")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        return run_serve(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"kvsift: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
