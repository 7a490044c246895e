"""Public names of the distributional math (design §2, §4.3, §4.4), kept at
`racer_vec.distributional`; the code lives in racer_vec.learner.distributional (JAX)."""

from racer_vec.learner.distributional import categorical_l2_project, cvar

__all__ = ["categorical_l2_project", "cvar"]
