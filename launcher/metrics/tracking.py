"""Weights & Biases, on global rank 0: the resolved config, every step record of
metrics.jsonl, checkpoint/resume/stop events and the final summary.

A resumed run continues the same wandb run: its id is kept in <run.dir>/wandb_id. wandb
keeps a run's history strictly increasing in step, so the steps a resumed run repeats
(those after the checkpoint it resumed from) stay as first logged there; metrics.jsonl keeps
both. `mode: offline` writes under <run.dir>/wandb and needs no network (`wandb sync` uploads
it later); `disabled` (the default) imports nothing.
"""

from __future__ import annotations

import netrc
import os
import secrets
from pathlib import Path
from urllib.parse import urlparse

from launcher.config.load import config_to_dict
from launcher.config.schema import Config, WandbConfig
from launcher.errors import ConfigError


def check_wandb_login(wandb_cfg: WandbConfig) -> None:
    """`online` needs credentials: refuse at start, in one line, instead of failing at step 1."""
    if wandb_cfg.mode != "online" or os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    raise ConfigError("logging.wandb.mode", f"online, but there is no wandb login for {host}: run `wandb login` "
                      "or set WANDB_API_KEY, or use mode: offline (sync later) or disabled")


class Tracker:
    def __init__(self, cfg: Config, run_dir: Path, is_writer: bool):
        self.run = None
        wandb_cfg = cfg.logging.wandb
        if not is_writer or wandb_cfg.mode == "disabled":
            return
        import wandb  # lazy: a heavy import, and `disabled` (the default) must not need it

        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(mode=wandb_cfg.mode, project=wandb_cfg.project, entity=wandb_cfg.entity,
                              name=wandb_cfg.name or cfg.run.name, tags=wandb_cfg.tags or None,
                              config=config_to_dict(cfg), dir=str(run_dir), id=run_id, resume="allow",
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, record: dict) -> None:
        if self.run:
            values = {k: v for k, v in record.items() if k not in ("step", "time") and v is not None}
            self.run.log(values, step=record["step"])

    def event(self, record: dict) -> None:
        if self.run:
            kind = record["event"]
            self.run.summary[f"last_{kind}_step"] = record["step"]
            if kind == "resume":
                self.run.summary["resumes"] = int(self.run.summary.get("resumes", 0) or 0) + 1

    def finish(self, summary: dict) -> None:
        if self.run:
            self.run.summary.update({k: v for k, v in summary.items() if v is not None})
            self.run.finish()
            self.run = None
