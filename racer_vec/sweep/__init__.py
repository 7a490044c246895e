"""Sweeps: one train.py run per grid point and seed, each a Ray Tune trial (design §12).

    python -m racer_vec.sweep highway_fast --grid agent.cvar_risk=0,0.5,0.8 --seeds 0 1 --max-steps 120000
    python -m racer_vec.sweep --resume runs/<sweep-name>     # unfinished trials continue, finished ones are skipped
    python -m racer_vec.sweep --report runs/<sweep-name>     # evaluate, results files, table, plot (no Ray)

Trials. A trial is an ordinary run: the Ray Tune trainable (`tune.SweepTrial`) starts `python train.py
PRESET [flags] --seed S --runs-dir <sweep> --run-name <trial>`, or `train.py --resume <its run dir>`
when the run directory holds a checkpoint, and reports each line train.py appends to metrics.jsonl
to Tune. When the process dies the trainable raises, Tune's FailureConfig(max_failures) retries the
trial, and the retry continues from the run's own latest checkpoint, never from step 0. Ray Tune does
all the scheduling: the grid is Tune's grid_search, a trial's resources are its placement group
(num_envs + 1 CPUs unless --cpus-per-trial), retries and the experiment state that --resume restores
(`<sweep>/.tune`) are Tune's.

Processes. The trial's Ray worker starts `supervisor` in a session of its own (a terminal's Ctrl-C
reaches the sweep, which decides), and the supervisor runs train.py with PR_SET_PDEATHSIG = SIGTERM:
however the worker ends (a Ray worker SIGKILLs its children when it exits, even when Tune stops it
normally), train.py writes a checkpoint and exits, as on Ctrl-C. Each trial holds its run's lock
(`<sweep>/<trial>/run.lock`, the one every train.py takes: design §8), and train.py inherits the
trial's open lock file: a retry waits for the previous attempt's process to finish its checkpoint,
a `train.py --resume` of the trial's run beside it is refused, and the sweep, after stopping Ray,
waits until no trial process of this machine is left. Ctrl-C and SIGTERM stop the sweep through
Tune's own interrupt handling: Tune saves its experiment state and stops the trials, then a locally
started Ray is shut down; a second Ctrl-C stops waiting and kills what is left. A sweep that dies
unasked (SIGKILL) leaves nothing running either: its `watchdog`, a process in a session of its own,
ends what the sweep started (Ray's processes, and the trials' processes, which checkpoint on
SIGTERM) within seconds.

runs/<sweep-name>/ holds sweep.json (the command, the trials and their train.py flags), one run
directory per trial (`cvar_risk=0.5_seed=0/`: config.json, metrics.jsonl, checkpoints/, eval/, and
train.log, the process's output, each attempt's under a line naming its Ray node; run.lock), .tune/
(Ray Tune's state), and the report: results/, table.md (one row per grid point, mean ± std over
seeds) and learning_curves.png.

Modules: `cli` (the command line), `grid` (keys, values, trial names, train.py's flags, validation),
`sweep_dir` (plan and open the sweep's directory), `trial` (a trial's process, its lock, its metrics),
`supervisor` (the process between a Ray worker and train.py), `watchdog` (the process that ends the
sweep's processes when the sweep dies), `tune` (Ray Tune: the trainable, the tuner, the run), `report`
(evaluation, results files, table, plot), `__main__` (the command).
Nothing needs the network: a local Ray instance listens on 127.0.0.1 and starts neither its dashboard
nor usage statistics unless asked. Only `tune` imports Ray, and only once the input has been checked,
so bad input fails before any Ray start and --report runs without Ray. No JAX here: the report's
evaluation imports it. This package imports nothing itself: the supervisor's import chain stays light.

Ray Tune stores the trainable classes by their import path (`racer_vec.sweep.tune.SweepTrial`), so a
sweep started before this package existed (racer_vec/tools/sweep.py) resumes only from a checkout of
the commit that started it.
"""
