"""`python -m racer_vec.sweep`: check the input, plan or open the sweep, run it on Ray Tune, report
(design §12; the package's docstring says how)."""

from __future__ import annotations

import signal
import sys

from racer_vec.config import ConfigError
from racer_vec.run.signals import stop_signals
from racer_vec.sweep.cli import parse_command_line, sigterm_as_ctrl_c
from racer_vec.sweep.grid import validate_trials
from racer_vec.sweep.report import write_report
from racer_vec.sweep.sweep_dir import check_settings, create_sweep, open_sweep, plan_sweep
from racer_vec.write_failures import WriteFailed, error_exit


def main(argv: list[str] | None = None) -> int:
    with stop_signals(sigterm_as_ctrl_c, (signal.SIGTERM,)):
        try:
            return _main(list(sys.argv[1:] if argv is None else argv))
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130


def _main(argv: list[str]) -> int:
    try:
        args, line = parse_command_line(argv)
        if args.report is not None:
            _, spec = open_sweep(args.report, line, "--report")
            return write_report(spec, args.report_episodes, args.report_workers)
        if args.resume is not None:
            sweep_dir, spec = open_sweep(args.resume, line, "--resume")
        else:
            sweep_dir, spec = plan_sweep(args, line, argv)
        trials = validate_trials(spec)
        check_settings(args, spec, trials)
        try:  # only now: bad input fails before Ray's import and start
            from racer_vec.sweep import tune
        except ImportError as exc:
            raise ConfigError(str(exc)) from None
        if args.address is not None:
            tune.check_address(args.address)
        if args.resume is None:
            create_sweep(sweep_dir, spec)
    except (ConfigError, WriteFailed) as exc:
        return error_exit(exc)
    return tune.run_sweep(args, spec, trials)


if __name__ == "__main__":
    sys.exit(main())
