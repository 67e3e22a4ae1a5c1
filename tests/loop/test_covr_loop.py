"""The COVR loop end to end on CPU: rounds, fine-tunes, guidance, metrics, resume, and the off switch."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from tests.helpers import TINY

import covr_lightning
from covr_lightning.build import build_loop
from covr_lightning.config import load_recipe, packaged_recipes_dir
from covr_lightning.errors import ConfigError
from covr_lightning.loop.checkpoint import STATE_FILE, latest_checkpoint, read_state
from covr_lightning.loop.covr_loop import COVRLoop
from covr_lightning.loop.rl_loop import RLLoop
from covr_lightning.tracking.progress import TrainingProgress

# 1200 env steps of cartpole (25-agent-step episodes); rounds end at 200, 400, 800 and 1200:
# three fine-tunes, guidance from round 2 on. top_k 0.5 keeps half of D_f whatever the entropy.
COVR_TINY = [
    *TINY,
    "run.total_env_steps=1200",
    "covr.psi_0=200",
    "covr.cold_start_rounds=2",
    "covr.sft_every=1",
    "covr.sft_min_steps=12",
    "covr.vlm_image_size=56",
    "vlm.init_args.lora_rank=4",
    "vlm.init_args.lora_alpha=8",
    "sft.init_args.batch_size=8",
    "sft.init_args.eddf_mode=top_k",
    "sft.init_args.eddf_quantile=0.5",
]


def _loop(overrides: list[str], name: str, resume=None):
    """The loop the builder picks for the quickstart with ``overrides``."""
    cfg = load_recipe("quickstart", [*overrides, f"run.name={name}"])
    return build_loop(cfg, resume=resume)


def _metric(client, run_id: str, key: str) -> list:
    return client.get_metric_history(run_id, key)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny COVR run, shared by the assertions below (about 20 s)."""
    folder = tmp_path_factory.mktemp("covr-run")
    previous = os.getcwd()
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    loop = _loop(COVR_TINY, "e2e")
    loop.fit()
    loop.run_dir = folder / loop.run_dir  # the tests below run from other folders
    os.chdir(previous)
    yield loop, mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_runs_every_round_and_fine_tune(finished):
    loop, _ = finished
    assert [(r.start, r.end, r.guided, r.fine_tune) for r in loop.rounds] == [
        (0, 200, False, True),
        (200, 400, False, True),
        (400, 800, True, True),
        (800, 1200, True, False),
    ]
    assert loop.round_index == 4 and loop.phase == "rl"
    assert loop.env_steps == 1200
    assert sorted(p.name for p in (loop.run_dir / "adapters").iterdir()) == [
        "round_0", "round_1", "round_2"
    ]  # fmt: skip
    # D_f was cleared after round 2's fine-tune; the last round (no fine-tune after) feeds none.
    assert len(loop.sft) == 0


def test_mlflow_run_holds_the_covr_metrics(finished):
    loop, client = finished
    run = client.get_run(loop.mlflow_run_id)
    assert run.info.status == "FINISHED"
    keys = set(run.data.metrics)
    for key in [
        "rl/critic_loss", "rl/actor_loss", "guide/prior_penalty", "eval/return",
        "vlm/sft_loss", "vlm/token_accuracy", "eddf/threshold", "eddf/kept_fraction",
        "ralw/mean_weight", "sft/rows_in", "sft/rows_kept", "sft/rows_out", "sft/rows_dropped",
        "guide/invalid_rate", "guide/critic_prefers_prior", "guide/prior_accepted_frac",
        "schedule/round", "time/rl_phase_s", "time/vlm_phase_s", "vlm/eval_return",
    ]:  # fmt: skip
        assert key in keys, key
    rounds = [(m.step, m.value) for m in _metric(client, loop.mlflow_run_id, "schedule/round")]
    assert [value for _, value in rounds] == [0, 1, 2, 3]
    sft_steps = [m.step for m in _metric(client, loop.mlflow_run_id, "vlm/sft_loss")]
    assert len(sft_steps) == 3 and all(math.isfinite(m.value) for m in
                                       _metric(client, loop.mlflow_run_id, "vlm/sft_loss"))  # fmt: skip
    # The prior term is logged only once guidance is on (round 2 starts at env step 400).
    penalty_steps = [m.step for m in _metric(client, loop.mlflow_run_id, "guide/prior_penalty")]
    assert penalty_steps and min(penalty_steps) > 400
    # Every fine-tune reaches the floor of optimizer steps (covr.sft_min_steps=12), though
    # D_f of a 200-env-step round holds 25 rows (about 2 batches after EDDF).
    steps = [m.value for m in _metric(client, loop.mlflow_run_id, "vlm/sft_steps")]
    assert len(steps) == 3 and min(steps) >= 12
    # The VLM acting alone: before any fine-tune (env step 0) and after each of the three.
    vlm_eval = _metric(client, loop.mlflow_run_id, "vlm/eval_return")
    assert [m.step for m in vlm_eval] == [0, 200, 400, 800]
    assert all(math.isfinite(m.value) for m in vlm_eval)
    artifacts = [a.path for a in client.list_artifacts(loop.mlflow_run_id, "adapters")]
    assert artifacts == ["adapters/round_0", "adapters/round_1", "adapters/round_2"]


def test_priors_are_stored_only_in_guided_rounds(finished):
    loop, _ = finished
    batch, present = loop.replay.transitions_at(np.arange(loop.replay.last_transition_id + 1))
    mask = batch["prior_mask"].numpy()[present]
    # Replay holds all 150 transitions; the first 50 (rounds 0-1, 400 env steps) are unguided.
    assert present.sum() == 150
    assert mask[:50].sum() == 0
    # prior_scope "query": only the transition whose frame the guide read carries the prior
    # (steps 0, 10 and 20 of each 25-step episode), and only where its answer was readable.
    assert set(np.flatnonzero(mask) % 25) <= {0, 10, 20}
    prior = batch["prior"].numpy()[present]
    assert np.all(np.abs(prior) <= 1.0)


def test_checkpoint_holds_adapter_d_f_and_position(finished):
    loop, _ = finished
    state = read_state(latest_checkpoint(loop.run_dir), fix="")
    assert state["loop"]["round_index"] == 4 and state["loop"]["phase"] == "rl"
    adapter = state["covr"]["adapter"]
    assert adapter and all("lora_" in k for k in adapter)
    assert (latest_checkpoint(loop.run_dir) / "sft" / "meta.json").is_file()


def test_resume_between_the_phases_finishes_like_one_run(workdir):
    # Stop right after the RL phase of round 1 (its checkpoint has phase "vlm", D_f full).
    no_mlflow = [*COVR_TINY, "tracking.enabled=false"]
    first = _loop(no_mlflow, "between")

    with TrainingProgress(1200) as first.progress:
        first._rl_phase(first.rounds[0])
        first.phase = "vlm"
        first.save()
    rows = len(first.sft)
    assert rows > 0

    resumed = _loop(no_mlflow, "between", resume="last")
    assert resumed.phase == "vlm" and resumed.round_index == 0 and len(resumed.sft) == rows
    resumed.fit()
    assert resumed.env_steps == 1200 and resumed.round_index == 4
    assert sorted(p.name for p in (resumed.run_dir / "adapters").iterdir()) == [
        "round_0", "round_1", "round_2"
    ]  # fmt: skip


def test_covr_agent_is_bit_identical_to_the_unguided_run_until_guidance_starts(workdir):
    """The VLM side (its build, a fine-tune) draws from its own streams: up to the first guided
    step (env step 400 here: two cold-start rounds, one fine-tune between them) the agent of a
    COVR run is exactly the agent of the same seed without COVR."""
    common = ["run.total_env_steps=400", "tracking.enabled=false"]
    covr = _loop([*COVR_TINY, *common], "covr-unguided")
    covr.fit()
    assert (covr.run_dir / "adapters" / "round_0").is_dir()  # the fine-tune did run
    plain = _loop([*COVR_TINY, *common, "covr.enabled=false"], "plain")
    plain.fit()
    assert covr.updates == plain.updates > 0
    for name, value in plain.module.state_dict().items():
        if torch.is_tensor(value) and value.is_floating_point():
            assert torch.equal(value, covr.module.state_dict()[name]), name


def test_the_builder_picks_the_loop_by_covr_enabled(workdir):
    off = _loop([*TINY, "covr.enabled=false", "tracking.enabled=false"], "off")
    assert type(off) is RLLoop and "prior" not in off.replay.extras
    on = _loop([*COVR_TINY, "tracking.enabled=false"], "on")
    assert type(on) is COVRLoop and "prior" in on.replay.extras


@pytest.mark.parametrize(
    ("overrides", "min_batch"),
    [([], 4), (["covr.guide_every=1"], 32), (["covr.guide_every=1", "covr.guide_min_batch=5"], 5)],
)
def test_the_guide_worker_batches_by_cadence_unless_told(workdir, overrides, min_batch):
    loop = _loop([*COVR_TINY, "tracking.enabled=false", "covr.guide_every=10", *overrides], "mb")
    try:
        assert loop.queries.worker.min_batch == min_batch
    finally:
        loop.close()


def test_checkpoints_of_the_other_loop_are_refused(workdir):
    overrides = [*TINY, "run.total_env_steps=200", "tracking.enabled=false"]
    _loop([*overrides, "covr.enabled=false"], "plain").fit()
    with pytest.raises(ConfigError, match="covr.enabled=false"):
        _loop([*overrides, "covr.psi_0=100"], "plain", resume="last")
    _loop([*COVR_TINY, "run.total_env_steps=200", "tracking.enabled=false"], "covr").fit()
    with pytest.raises(ConfigError, match="written by a COVR run"):
        _loop([*overrides, "covr.enabled=false"], "covr", resume="last")


def test_missing_vlm_section_is_a_config_error(workdir, tmp_path):
    recipe = packaged_recipes_dir() / "quickstart.yaml"
    text = recipe.read_text()
    trimmed = text[: text.index("vlm:")] + text[text.index("sft:") :]
    path = tmp_path / "novlm.yaml"
    path.write_text(trimmed)
    with pytest.raises(ConfigError, match="no vlm section"):
        build_loop(load_recipe(str(path)))


def _env() -> dict[str, str]:
    package_root = str(Path(covr_lightning.__file__).resolve().parents[1])
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
    }


@pytest.mark.slow
def test_killed_mid_round_resumes_to_the_same_budget_and_rounds(workdir):
    args = ["fit", "--recipe", "quickstart", *COVR_TINY, "run.name=killed"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "covr_lightning", *args], stderr=subprocess.DEVNULL, env=_env()
    )
    run_dir = workdir / "runs" / "covr-quickstart" / "killed"
    deadline = time.time() + 240
    # Kill once the first fine-tune is done and the guided rounds are under way.
    while time.time() < deadline and proc.poll() is None:
        found = latest_checkpoint(run_dir)
        if found is not None and int(found.name.split("_")[-1]) >= 600:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = latest_checkpoint(run_dir)
    assert 0 < int(killed.name.split("_")[-1]) < 1200
    assert (killed / STATE_FILE).is_file()

    done = subprocess.run(
        [sys.executable, "-m", "covr_lightning", *args, "--resume", "last"],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    final = latest_checkpoint(run_dir)
    assert final.name == "env_step_000001200"
    state = torch.load(final / STATE_FILE, weights_only=False)
    assert state["loop"]["round_index"] == 4 and state["loop"]["env_steps"] == 1200


def test_eddf_entropy_is_per_action_dimension_so_its_scale_is_not_saturated():
    """SAC holds the summed entropy near -|A|: for cheetah's 6 actuators s(-6) = 0.998 is a
    constant; per dimension the same policy gives s(-1) = 0.73, and an exploring one less."""
    from types import SimpleNamespace

    from covr_lightning.data.eddf import entropy_scale

    settled = SimpleNamespace(module=SimpleNamespace(policy_entropy=-6.0), action_dim=6)
    exploring = SimpleNamespace(module=SimpleNamespace(policy_entropy=3.0), action_dim=6)
    h_settled = COVRLoop.entropy_per_dimension(settled)
    h_exploring = COVRLoop.entropy_per_dimension(exploring)
    assert h_settled == -1.0 and h_exploring == 0.5
    assert entropy_scale(h_settled) == pytest.approx(0.731, abs=1e-3)
    assert entropy_scale(h_settled) - entropy_scale(h_exploring) > 0.3
    assert entropy_scale(-6.0) > 0.99  # the summed entropy's scale: no room to move
