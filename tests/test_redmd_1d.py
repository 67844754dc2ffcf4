"""scripts/redmd_1d.py: the fixed-point argument of docs/toy_world.md ("Re-DMD") on a 1-D teacher with exact scores.
Plain DMD and the reference's Re-DMD rest at the teacher's share of the fast mode; the reward-tilted critic at the
teacher tilted by exp(beta r) (its odds times the modes' mean exp(beta r)), on either side."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import redmd_1d  # noqa: E402

TEACHER = 0.385


@pytest.fixture(scope="module")
def shares():
    # 128 particles from a 0.1 start, 800 steps: ~1.5 s a run; the share is settled by then (the script's default is
    # 512 particles, 3000 steps)
    return {name: redmd_1d.simulate(redmd_1d.METHODS[name], 0.1, teacher_fast=TEACHER, particles=128, steps=800)
            for name in ("dmd", "re-dmd 1", "tilt +1", "tilt -1")}


def test_predictions():
    assert redmd_1d.METHODS["dmd"].predicted(TEACHER) == pytest.approx(TEACHER)
    assert redmd_1d.METHODS["re-dmd 3"].predicted(TEACHER) == pytest.approx(TEACHER)
    # odds 0.626 times the modes' mean exp(+-r): the clamped reward averages 0.0399 on the static mode, 0.9601 on
    # the fast one, so about exp(+-0.920)
    # E[exp(clamp(X, 0, 1))], X ~ N(0, 0.1^2): P(X < 0) + E[exp(X); X > 0] = 0.5 + exp(0.005) Phi(0.1) = 1.042533
    assert redmd_1d.mean_exp_reward(0.0, 1.0) == pytest.approx(0.5 + math.exp(0.005) * 0.5398278, abs=1e-5)
    assert redmd_1d.METHODS["tilt +1"].predicted(TEACHER) == pytest.approx(0.611, abs=1e-3)
    assert redmd_1d.METHODS["tilt -1"].predicted(TEACHER) == pytest.approx(0.1997, abs=1e-3)


def test_generator_weights_leave_the_teacher_as_the_rest_point(shares):
    # 128 particles: one particle is 0.008 of the share
    assert shares["dmd"]["fast_fraction"] == pytest.approx(TEACHER, abs=0.05)
    assert shares["re-dmd 1"]["fast_fraction"] == pytest.approx(TEACHER, abs=0.05)


def test_tilted_critic_moves_the_share_to_the_prediction(shares):
    up, down, plain = (shares[m]["fast_fraction"] for m in ("tilt +1", "tilt -1", "dmd"))
    assert up == pytest.approx(redmd_1d.METHODS["tilt +1"].predicted(TEACHER), abs=0.05) and up - plain > 0.15
    assert down == pytest.approx(redmd_1d.METHODS["tilt -1"].predicted(TEACHER), abs=0.05) and plain - down > 0.1
    # the tilt moves mass between the modes; it does not drag the fast mode along the reward (no reward hacking)
    assert shares["tilt +1"]["fast_mean"] == pytest.approx(1.0, abs=0.05)


def test_cli_rejects_bad_arguments(capsys):
    assert redmd_1d.main(["--methods", "dmd,tilt +2"]) == 2
    assert "'tilt +2' is not one of" in capsys.readouterr().err
    assert redmd_1d.main(["--teacher_fast", "1.5"]) == 2
    assert "--teacher_fast 1.5 must be in (0, 1)" in capsys.readouterr().err
