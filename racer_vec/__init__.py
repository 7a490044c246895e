"""racer-vec: a vectorized single-process JAX trainer for RACER on highway-env. (No JAX imported here.)

Importing racer_vec registers its env layer as gymnasium ids (design §3), e.g.
`gym.make("racer_vec/highway-fast-v0")`, without importing gymnasium: the sweep's supervisor and
watchdog import racer_vec and nothing beyond the standard library (design §12). The ids are
registered at once where gymnasium is imported already, else as soon as it is.
"""

import sys

ENV_IDS = {
    "racer_vec/highway-v0": "racer_highway",
    "racer_vec/highway-fast-v0": "highway_fast",
}
"""Each gymnasium id and the preset whose env it makes: one per distinct preset env
(racer_highway_distributed trains in racer_highway's)."""


def _register_envs(gymnasium) -> None:
    for env_id, preset in ENV_IDS.items():
        gymnasium.register(
            env_id, entry_point="racer_vec.sim.gym_envs:make_preset_env", kwargs={"preset": preset}
        )


class _RegisterOnImport:
    """A meta path finder for gymnasium alone: gymnasium's own loader imports it, then the ids are
    registered and the finder leaves sys.meta_path (a find_spec alone, as in a check that gymnasium
    is installed, leaves it in place)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "gymnasium":
            return None
        import importlib.util

        sys.meta_path.remove(_RegisterOnImport)  # while the other finders find gymnasium
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, _RegisterOnImport)
        if spec is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                if _RegisterOnImport in sys.meta_path:
                    sys.meta_path.remove(_RegisterOnImport)
                _register_envs(module)

            spec.loader.exec_module = exec_then_register
        return spec


if getattr(sys, "argv", [])[:1] == ["-m"]:
    # `python -m racer_vec.<tool>` imports racer_vec while it locates the tool, before the tool's own imports
    from racer_vec.missing_dependency import report_missing_dependencies

    report_missing_dependencies()

if "gymnasium" in sys.modules:
    _register_envs(sys.modules["gymnasium"])
else:
    sys.meta_path.insert(0, _RegisterOnImport)
