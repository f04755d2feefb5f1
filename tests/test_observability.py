"""wandb (offline, read back from its own run file), figures, progress, and the report."""

import subprocess

import matplotlib.image as mpimg
from launch import base_env, python_cmd, read_events, read_metrics, train
from wandb_reader import history, run_ids
from launch import WORKDIR  # noqa: E402

SINGLE = ["parallel.tensor=1", "parallel.pipeline=1", "train.log_every=1", "schedule.warmup_steps=2"]


def test_offline_wandb_history_holds_every_logged_loss_and_resume_keeps_the_run(tmp_path):
    first = train(python_cmd(), tmp_path, *SINGLE, "train.steps=4", "train.eval_every=2", "checkpoint.every=2",
                  "logging.wandb.mode=offline", "logging.wandb.tags=[ci, cpu]")
    run_id = (tmp_path / "wandb_id").read_text().strip()
    rows = history(tmp_path)
    assert {r["_step"]: r["loss"] for r in rows} == {m["step"]: m["loss"] for m in first}
    assert rows[1]["val_loss"] == first[1]["val_loss"]

    train(python_cmd(), tmp_path, *SINGLE, "train.steps=6", "train.eval_every=2", "checkpoint.every=2",
          "logging.wandb.mode=offline")
    assert [e["step"] for e in read_events(tmp_path, "resume")] == [4]
    assert (tmp_path / "wandb_id").read_text().strip() == run_id
    assert run_ids(tmp_path) == {run_id}  # both offline run directories are the same wandb run
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 2


def test_online_without_login_is_a_one_line_error_at_start(tmp_path):
    env = base_env(HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"))
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run([*python_cmd(), *SINGLE, "logging.wandb.mode=online", f"run.dir={tmp_path}"], cwd=WORKDIR,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("config error: logging.wandb.mode: online, but there is no wandb login")
    assert len(result.stderr.strip().splitlines()) == 1


def test_figures_mfu_time_split_and_eta(tmp_path):
    result_dir = tmp_path / "run"
    train(python_cmd(), result_dir, *SINGLE, "train.steps=3", "train.eval_every=0", "logging.peak_tflops=1.0",
          "logging.time_breakdown=true")
    last = read_metrics(result_dir)[-1]
    assert last["samples_per_s"] > 0 and last["tflops_per_device"] > 0
    assert abs(last["mfu"] - last["tflops_per_device"] / 1.0) < 1e-12
    assert last["time_fwd_ms"] > 0 and last["time_bwd_ms"] > 0 and last["time_step_ms"] > 0
    log = subprocess.run([*python_cmd(), *SINGLE, "train.steps=3", "train.eval_every=0",
                          f"run.dir={tmp_path / 'eta'}"], cwd=WORKDIR, env=base_env(), capture_output=True, text=True,
                         timeout=300)
    assert log.returncode == 0, log.stderr[-2000:]
    assert " | eta " in log.stdout  # the fp16 loss scale's column: tests/test_precision.py


def test_report_plots_loss_lr_throughput_and_marks_resumes(tmp_path):
    run, other = tmp_path / "a", tmp_path / "b"
    train(python_cmd(), run, *SINGLE, "train.steps=6", "train.eval_every=3", "checkpoint.every=3")
    train(python_cmd(), run, *SINGLE, "train.steps=9", "train.eval_every=3", "checkpoint.every=3")  # resumes at 6
    train(python_cmd(), other, *SINGLE, "train.steps=9", "train.eval_every=3", "optimizer.lr=1e-3")

    from launcher.metrics.plots import build_figures

    figures = build_figures([run])
    assert set(figures) == {"loss.png", "lr.png", "throughput.png"}  # no MFU on CPU without a peak
    ax = figures["loss.png"].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["train"].get_xdata()) == list(range(1, 10))
    assert list(lines["val"].get_xdata()) == [3, 6, 9]
    assert list(lines["resume"].get_xdata()) == [6, 6]  # the resume marker

    out = subprocess.run([*python_cmd()[:-1], "launcher.report", str(run), "--compare", str(other)], cwd=WORKDIR,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("loss.png", "lr.png", "throughput.png"):
        image = mpimg.imread(run / "report-compare" / name)
        assert image.shape[0] > 300 and image.std() > 0.05  # a drawn plot, not a blank canvas
    compared = {line.get_label() for line in build_figures([run, other])["loss.png"].axes[0].get_lines()}
    assert {"a train", "b train", "a val", "b val", "resume a"} <= compared
