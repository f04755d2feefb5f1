"""Resuming a checkpoint on another tensor x pipeline x data layout and ZeRO stage
(launcher/checkpoint/reshard.py): the weights after the load are the saved ones exactly, and the next
steps' losses match the uninterrupted single-process run within 1e-5 (fp32)."""

import pytest
import torch
from distributed import run_distributed
from launch import (
    losses,
    python_cmd,
    read_events,
    read_metrics,
    run_cli,
    torchrun_cmd,
    train,
)

# Default model; a short run: checkpoints at 3 and 6 of 6 steps, 8 sequences per step.
BASE = ["train.eval_every=0", "train.log_every=1", "schedule.warmup_steps=2", "train.steps=6",
        "parallel.global_batch=8", "parallel.micro_batch=1", "precision.dtype=fp32", "checkpoint.keep_last=3"]


def layout(tp: int, pp: int, zero: int) -> list[str]:
    return [f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"zero.stage={zero}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The saved run (tp 2 x pp 2 x dp 2, ZeRO 1) and the uninterrupted reference (one process)."""
    saved = tmp_path_factory.mktemp("tp2pp2dp2")
    train(torchrun_cmd(8), saved, *BASE, *layout(2, 2, 1), "checkpoint.every=3")
    reference = tmp_path_factory.mktemp("single")
    train(python_cmd(), reference, *BASE, *layout(1, 1, 1), "checkpoint.every=0")
    return saved, {m["step"]: m["loss"] for m in read_metrics(reference)}


def _resume_in_process(rank, world_size, jobs):
    """Each job in turn on this 8-rank world: set up the launcher's run for the job's layout,
    resume (resharding), record every parameter of this rank (its weights and DeepSpeed's fp32
    master), then train to the end."""
    from deepspeed.utils import safe_get_full_fp32_param

    from launcher.checkpoint.state import check_resume_config
    from launcher.cli import DEFAULT_CONFIG
    from launcher.config.load import load_config
    from launcher.ds import choose_deepspeed_accelerator
    from launcher.ds.config import deepspeed_config
    from launcher.planning.plan import make_plan
    from launcher.planning.precision import detect_device_support
    from launcher.training.launch_env import discover
    from launcher.training.loop import StopSignal, train_loop
    from launcher.training.setup import resume, set_up

    choose_deepspeed_accelerator()
    results = []
    for overrides in jobs:
        cfg = load_config(str(DEFAULT_CONFIG), overrides)
        # launcher/training/preflight.py's steps, less DeepSpeed's own config check, which reads the world
        # size of the process group this test already started
        plan = make_plan(cfg, world_size, detect_device_support())
        check_resume_config(cfg, plan)
        run = set_up(cfg, plan, deepspeed_config(cfg, plan), discover(), torch.device("cpu"))
        resume(run)
        params = {p.logical_name: (p.detach().clone(), safe_get_full_fp32_param(p).clone())
                  for p in run.engine.ds.module.parameters()}
        code = train_loop(run, StopSignal())
        run.engine.ds.destroy()
        results.append({"tp": (run.groups.coord.tp, plan.layout.tp), "params": params, "code": code})
    return results


def _tp_slice(full: torch.Tensor, name: str, tp_rank: int, tp: int) -> torch.Tensor:
    from launcher.model import weights as hf_names

    dim = hf_names.tp_dim(name)
    return full if dim is None else full.chunk(tp, dim)[tp_rank]


def test_tp2_pp2_dp2_resumes_on_other_tensor_and_pipeline_degrees(runs, tmp_path):
    """tp 2 x pp 2 x dp 2 (ZeRO 1) step 3 -> tp 1 x pp 4 x dp 2 and tp 2 x pp 1 x dp 4 (ZeRO 1), in
    one 8-process world: every rank's weights and fp32 master equal the saved full tensors
    (read by launcher.export's reader, another code path) exactly; steps 4-6 match the
    uninterrupted single-process run."""
    from launcher.checkpoint.reader import CheckpointReader
    from launcher.model import weights as hf_names

    saved, reference = runs
    ckpt = saved / "checkpoints" / "step-00000003"
    targets = {"tp1pp4dp2": layout(1, 4, 1), "tp2pp1dp4": layout(2, 1, 1)}
    jobs = [[*BASE, *lay, f"run.dir={tmp_path / name}", f"checkpoint.resume={ckpt}"] for name, lay in targets.items()]
    per_rank = run_distributed(_resume_in_process, 8, jobs)
    reader = CheckpointReader(ckpt)
    seen = {name: set() for name in targets}
    for rank_results in per_rank:
        for name, result in zip(targets, rank_results):
            assert result["code"] == 0
            tp_rank, tp = result["tp"]
            for logical, (weight, master) in result["params"].items():
                expected = _tp_slice(reader.tensor(logical), logical, tp_rank, tp)
                assert torch.equal(weight, expected), (name, logical, tp_rank)
                assert torch.equal(master, expected), (name, logical, tp_rank)
                seen[name].add(logical)
    for name in targets:
        assert seen[name] == {ours for ours, _ in hf_names.weights(reader.model)}  # every weight, on some rank
        resume = read_events(tmp_path / name, "resume")[0]
        assert resume["resharded"] and resume["step"] == 3
        after = {m["step"]: m["loss"] for m in read_metrics(tmp_path / name)}
        assert sorted(after) == [4, 5, 6]
        diffs = [abs(after[s] - reference[s]) for s in (4, 5, 6)]
        print(f"\n{name}: |loss - uninterrupted single process| at steps 4-6: {', '.join(f'{d:.1e}' for d in diffs)}")
        assert max(diffs) < 1e-5, (name, after, reference)


def test_zero1_to_zero0_and_back_across_layouts(runs, tmp_path):
    """tp 2 x pp 2 x dp 2 ZeRO 1 step 3 -> one process with ZeRO 0 (a torch optimizer: state by
    parameter), whose step-4 checkpoint -> tp 2 x pp 2 x dp 1 with ZeRO 1 (tp and pp grow):
    each resume is announced in one line and the losses continue the uninterrupted run."""
    saved, reference = runs
    zero0 = tmp_path / "zero0"
    result = run_cli(python_cmd(), zero0, *BASE, *layout(1, 1, 0), "checkpoint.every=1",
                     f"checkpoint.resume={saved / 'checkpoints' / 'step-00000003'}")
    notices = [line for line in result.stdout.splitlines() if "resharded" in line]
    assert len(notices) == 1 and ("saved with tensor 2 x pipeline 2 x data 2, ZeRO 1, fp32: resharded to tensor 1 x "
                                  "pipeline 1 x data 1, ZeRO 0, fp32") in notices[0], notices
    zero1 = tmp_path / "zero1"
    train(torchrun_cmd(4), zero1, *BASE, *layout(2, 2, 1), f"checkpoint.resume={zero0 / 'checkpoints' / 'step-00000004'}")
    for run, steps in ((zero0, [4, 5, 6]), (zero1, [5, 6])):
        after = {m["step"]: m["loss"] for m in read_metrics(run)}
        assert sorted(after) == steps and read_events(run, "resume")[0]["resharded"]
        assert max(abs(after[s] - reference[s]) for s in steps) < 1e-5, (run.name, after, reference)
    assert losses(read_metrics(zero1))  # the run trained


def test_starting_weights_checkpoint_resumes_on_another_layout(runs, tmp_path):
    """A checkpoint of the starting weights (train.steps=0, as an import from Hugging Face
    writes one) has no optimizer state yet: one process, ZeRO 1 -> tp 1 x pp 2 with ZeRO 0
    (the torch optimizer, on two stages) trains steps 1-6 as the uninterrupted run does."""
    _, reference = runs
    start = tmp_path / "start"
    run_cli(python_cmd(), start, *BASE, *layout(1, 1, 1), "train.steps=0")
    resumed = tmp_path / "resumed"
    after = {m["step"]: m["loss"] for m in train(torchrun_cmd(2), resumed, *BASE, *layout(1, 2, 0),
                                                    f"checkpoint.resume={start / 'checkpoints' / 'step-00000000'}")}
    assert read_events(resumed, "resume")[0]["resharded"] and sorted(after) == [1, 2, 3, 4, 5, 6]
    assert max(abs(after[s] - reference[s]) for s in after) < 1e-5, (after, reference)
