"""Commands around runs: benchmark, plot, results, pendulum, sweep (`python -m racer_vec.<tool>`)."""
