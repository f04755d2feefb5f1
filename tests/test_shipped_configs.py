"""Every shipped config trains as its own structure (tests/shrink.py derives the CPU-sized
version): pipeline and tensor degrees, ZeRO stage, recomputation, GQA, precision. Each runs
4 steps with validation at steps 2 and 4 (every pipeline stage, middle ones included) and a
checkpoint at step 2; a second run resumes from that checkpoint and repeats steps 3-4 bit
for bit; a one-process run of the same shrunk model gives the same first loss."""

from pathlib import Path

import pytest
from launch import losses, python_cmd, read_events, torchrun_cmd, train
from shrink import shrink

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_trains_evaluates_saves_and_resumes(config, tmp_path):
    shrunk = shrink(config)
    print(f"\n{config.name}: {shrunk.describe()}")
    cmd = torchrun_cmd(shrunk.nproc) if shrunk.nproc > 1 else python_cmd()
    args = ["--config", str(config), *shrunk.overrides]
    whole = train(cmd, tmp_path / "whole", *args)
    assert [m["step"] for m in whole] == [1, 2, 3, 4]
    assert [m["step"] for m in whole if "val_loss" in m] == [2, 4]
    assert all(m["world_size"] == shrunk.nproc for m in whole)
    assert whole[-1]["loss"] < whole[0]["loss"]

    step2 = tmp_path / "whole/checkpoints/step-00000002"
    resumed = train(cmd, tmp_path / "resumed", *args, f"checkpoint.resume={step2}")
    assert [e["step"] for e in read_events(tmp_path / "resumed", "resume")] == [2]
    assert losses(resumed) == losses(whole)[2:]  # bit for bit, same layout
    assert resumed[-1]["val_loss"] == whole[-1]["val_loss"]

    if shrunk.nproc > 1:  # the layout computes what one process computes
        single = train(python_cmd(), tmp_path / "single", *args, "parallel.tensor=1", "parallel.pipeline=1",
                       "parallel.context=1", "parallel.data=1", "zero.stage=1", "train.steps=1", "train.eval_every=0")
        tolerance = 1e-4 if shrunk.dtype == "fp32" else 2e-2  # bf16: rounding differs with the split
        assert abs(single[0]["loss"] - whole[0]["loss"]) <= tolerance, (single[0]["loss"], whole[0]["loss"])
