"""The VLM fine-tune across processes: DDP on two CPU processes (gloo) trains as one process does."""

from __future__ import annotations

from functools import partial

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tests.helpers import TINY, distinct_frames

from covr_lightning.build import build_loop
from covr_lightning.cli import main
from covr_lightning.config import load_recipe
from covr_lightning.data.sft_build import BuiltSet
from covr_lightning.data.sft_loader import built_dataloader
from covr_lightning.loop.fine_tune import (
    FineTuneJob,
    SFTBudget,
    fine_tune_across_devices,
    sft_steps,
)
from covr_lightning.vlm.module import VLMLoRAModule
from covr_lightning.vlm.prompting import ActionPrompt, encode_sft_batch

VLM_ARGS = {"backbone": "tiny-qwen2.5-vl", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0}


def test_ddp_on_two_processes_trains_the_adapter_as_one_process_does(tmp_path):
    """Each rank takes half of every global batch and DDP averages the gradients: the adapter,
    the loss and the batch order come out as from one process on the whole batches."""
    vlm = VLMLoRAModule(**VLM_ARGS)
    torch.manual_seed(0)  # a nonzero LoRA B, so every adapter tensor gets a gradient at step 1
    start = {k: 0.05 * torch.randn_like(v) for k, v in vlm.adapter_state_dict().items()}
    vlm.load_adapter_state_dict(start)
    prompt = ActionPrompt("swing the pole up", "Answer with [a].").render(vlm.processor)
    n = 8
    frames = distinct_frames(n, 32)
    targets = [f"[{v:.2f}]" for v in np.linspace(-0.9, 0.9, n)]
    weights = np.linspace(0.5, 1.0, n)
    budget = SFTBudget(epochs=2, min_steps=0, max_steps=0, grad_clip=1.0)
    rng_state = np.random.Generator(np.random.PCG64(7)).bit_generator.state
    job = FineTuneJob(
        vlm_class="covr_lightning.vlm.module.VLMLoRAModule",
        vlm_args=VLM_ARGS,
        adapter=start,
        prompt_text=prompt,
        targets=targets,
        weights=weights,
        batch_size=4,
        bucket_by_length=True,
        rng_state=rng_state,
        budget=budget,
        seed=0,
        env_step=0,
    )
    result = fine_tune_across_devices(job, frames, "ddp", 2, "cpu", tmp_path / "job")
    assert not (tmp_path / "job").exists()  # the scratch folder is removed

    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = rng_state
    built = BuiltSet(
        np.arange(n), targets, weights, partial(encode_sft_batch, vlm.processor, prompt)
    )
    loader = built_dataloader(frames, built, 4, lambda: rng)
    optimizer = vlm.configure_optimizers()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    vlm.train()
    totals = sft_steps(
        vlm.training_step,
        lambda: vlm.last_metrics,
        optimizer,
        lambda: loader,
        budget,
        torch.device("cpu"),
        clip=lambda max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm),
    )
    assert result.metrics["vlm/sft_steps"] == totals.steps == 4
    assert result.metrics["vlm/sft_devices"] == 2
    one_process = totals.metrics()
    assert result.metrics["vlm/sft_loss"] == pytest.approx(one_process["vlm/sft_loss"], rel=1e-4)
    assert result.rng_state == rng.bit_generator.state  # the same global batches were drawn
    trained = vlm.adapter_state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    for key, value in trained.items():
        torch.testing.assert_close(result.adapter[key], value, atol=2e-5, rtol=1e-4)


def test_a_covr_run_fine_tunes_across_two_processes(workdir):
    """The loop hands the round's SFT set to two spawned ranks and continues with their adapter."""
    overrides = [
        *TINY,
        "run.total_env_steps=400",
        "covr.psi_0=200",
        "covr.cold_start_rounds=5",
        "covr.sft_min_steps=3",
        "covr.vlm_eval_episodes=0",
        "covr.sft_strategy=ddp",
        "covr.sft_devices=2",
        "run.name=ddp",
    ]
    loop = build_loop(load_recipe("quickstart", overrides))
    loop.fit()
    client = mlflow.MlflowClient()
    devices = client.get_metric_history(loop.mlflow_run_id, "vlm/sft_devices")
    steps = client.get_metric_history(loop.mlflow_run_id, "vlm/sft_steps")
    assert [m.value for m in devices] == [2.0] and steps[0].value >= 3
    saved = load_file(loop.run_dir / "adapters" / "round_0" / "adapter_model.safetensors")
    live = loop.vlm.adapter_state_dict()
    assert len(saved) == len(live)
    for key, value in saved.items():  # the guide answers with the ranks' adapter
        matches = [k for k in live if k.replace(".default", "") == key or k == key]
        assert matches and torch.equal(live[matches[0]], value), key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["covr.sft_devices=2"], "covr.sft_devices=2 needs covr.sft_strategy=ddp or fsdp"),
        (
            ["covr.sft_strategy=fsdp", "covr.sft_devices=2", "run.accelerator=cpu"],
            "covr.sft_strategy=fsdp needs CUDA devices",
        ),
    ],
)
def test_a_fine_tune_the_machine_cannot_run_is_one_line(workdir, capsys, overrides, message):
    argv = ["fit", "--recipe", "quickstart", *TINY, "run.total_env_steps=400", *overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Fix:" in err[-1]
    assert not (workdir / "runs").exists()
