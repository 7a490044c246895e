"""Evaluate a trained RACER checkpoint, or a baseline policy, on highway-env (see --help).

    python evaluate.py --checkpoint runs/<run>[/checkpoints[/<step>]] [--num-episodes 20] [--no-render]
    python evaluate.py --policy zero --preset highway_fast
"""

from __future__ import annotations

import sys

from racer_vec.missing_dependency import report_missing_dependencies  # standard library only


def main(argv: list[str] | None = None) -> int:
    # Everything is imported inside main(): spawned env workers re-import this module as __mp_main__.
    from racer_vec.sim.video import configure_headless

    # before pygame or any worker starts: workers inherit the environment
    configure_headless()

    import tyro

    from racer_vec.config import ConfigError
    from racer_vec.run.eval_cli import EvalArgs, run_evaluation

    args = tyro.cli(EvalArgs, args=argv)
    try:
        return run_evaluation(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    report_missing_dependencies()  # python3 evaluate.py outside .venv: one line, no traceback
    sys.exit(main())
