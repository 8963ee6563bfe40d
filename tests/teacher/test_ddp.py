"""Scale-out is the Trainer's: two-process DDP on CPU (gloo) through the CLI, no code change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from teacher.checkpoint import load_teacher, read_checkpoint
from tests.teacher.test_lightning import SMALL, write_corpus

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path: Path) -> None:
    manifest = write_corpus(tmp_path / "corpus", per_split=2)
    root = tmp_path / "run"
    args = ["--config", "tiny", "--data.manifest", str(manifest), "--data.clip_s", "2.0",
            "--data.batch_size", "2", "--model.config", json.dumps(SMALL),
            "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root)]
    script = tmp_path / "fit_ddp.py"  # DDP re-launches this file once per extra rank
    script.write_text(textwrap.dedent(f"""
        import sys
        import torch
        torch.set_num_threads(1)
        from teacher.cli import fit
        sys.exit(fit({args!r}))
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PL_DISABLE_FORK": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "world_size: 2" in done.stderr + done.stdout or "GLOBAL_RANK: 1" in done.stderr
    checkpoint = read_checkpoint(root / "teacher.ckpt")
    assert checkpoint["global_step"] == 3
    assert checkpoint["hyper_parameters"]["config"]["clip_s"] == 2.0
    teacher = load_teacher(root / "teacher.ckpt")
    with torch.inference_mode():
        assert teacher.encode_audio(torch.zeros(1, 32000)).shape[0] == 1
