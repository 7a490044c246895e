"""Train RACER on highway-env: `python train.py [PRESET] [--flags]` (see --help)."""

from __future__ import annotations

import sys

from racer_vec.missing_dependency import report_missing_dependencies  # standard library only


def main(argv: list[str] | None = None) -> int:
    # JAX is imported inside main(): spawned env workers re-import this module as __mp_main__.
    from racer_vec.run.train_cli import parse_train_args
    from racer_vec.config import ConfigError

    try:
        cfg = parse_train_args(argv)
        from racer_vec.run.run_dir import RunDirectory

        # before JAX and any worker: a run another process trains in, or a place that cannot be
        # written, is one line and exit 2 at once (design §8)
        directory = RunDirectory(cfg)
        directory.lock()
        from racer_vec.run.training import train

        return train(cfg, directory)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C before the training loop took over SIGINT (during start-up): nothing to save yet.
        print("interrupted during start-up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    report_missing_dependencies()  # python3 train.py outside .venv: one line, no traceback
    sys.exit(main())
