"""python -m racer_vec.profile_learner: kernels classified by kind and by part, and a real trace of a tiny learner."""

import collections
import dataclasses
import json
import subprocess
import sys

import pytest

import configs
from racer_vec import profile_learner
from racer_vec.config import resolve

HLO = """HloModule m

%fused_dot (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_exp (p0: f32[4,2]) -> f32[4,2] {
  %p0 = f32[4,2]{1,0} parameter(0)
  ROOT %exp.1 = f32[4,2]{1,0} exponential(%p0)
}

ENTRY %main (a: f32[4,8], b: f32[8,2]) -> f32[4,2] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %ynn_fusion = f32[4,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(iteration)/while/body/closed_call/while/body/closed_call/transpose(jvp(critic_loss))/dot_general"}
  ROOT %wrapped_exponential = f32[4,2]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_exp, metadata={op_name="jit(iteration)/while/body/closed_call/policy_step/apply_step/exp"}
}
"""


def test_kernels_are_summed_by_kind_and_by_outermost_part():
    own = collections.Counter({"ynn_fusion": 6_000_000, "wrapped_exponential": 3_000_000, "ThunkExecutor::Execute": 1_000_000})
    calls = collections.Counter({"ynn_fusion": 2, "wrapped_exponential": 2, "ThunkExecutor::Execute": 2})
    report = profile_learner.summarize(own, calls, HLO, iterations=2, top=2)
    assert report["kernel_ms_per_iteration"] == pytest.approx(5.0)
    assert report["by_kind"] == pytest.approx({"matmul": 0.6, "elementwise": 0.3, "runtime": 0.1})
    assert report["by_part"] == pytest.approx({
        profile_learner.PARTS["critic_loss"]: 0.6, profile_learner.PARTS["policy_step"]: 0.3, "runtime": 0.1})
    assert [k["kernel"] for k in report["top_kernels"]] == ["ynn_fusion", "wrapped_exponential"]
    assert report["top_kernels"][0]["ms_per_iteration"] == pytest.approx(3.0)
    assert report["top_kernels"][0]["calls_per_iteration"] == 1


@pytest.mark.parametrize("body, kind", [
    ("  %r = f32[2] reduce(%x, %z), dimensions={1}", "reduce"),
    ("  %t = f32[2,3] transpose(%x), dimensions={1,0}", "copy/transpose/concatenate"),
    ("  %s = f32[9] scatter(%x, %i, %u)", "scatter/gather"),
    ("  %a = f32[2] add(%x, %y)", "elementwise"),
])
def test_kind_of_a_fusion_body(body, kind):
    assert profile_learner.kind_of("fusion", body) == kind


@pytest.mark.slow
def test_profile_of_a_tiny_learner_accounts_for_every_part(tmp_path):
    base = configs.PRESETS["highway_fast"]
    cfg = resolve(dataclasses.replace(
        base, agent=dataclasses.replace(base.agent, hidden_dims=(32, 32), pointnet_dim=16, num_atoms=21),
        batch_size=32, utd_ratio=2, buffer_size=1000))
    report = profile_learner.profile(cfg, iterations=2, top=5)
    assert sum(report["by_kind"].values()) == pytest.approx(1.0)
    assert sum(report["by_part"].values()) == pytest.approx(1.0)
    assert report["by_kind"]["matmul"] > 0
    for part in ("critic_target", "critic_loss", "apply_step", "actor_tall_pass", "policy_step"):
        assert report["by_part"].get(profile_learner.PARTS[part], 0) > 0, part
    assert len(report["top_kernels"]) == 5
    json.dumps(report)


@pytest.mark.parametrize("args, message", [
    (["no_such_preset"], "PRESET 'no_such_preset'"),
    (["highway_fast", "--iterations", "0"], "--iterations"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = subprocess.run([sys.executable, "-m", "racer_vec.profile_learner", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
