"""Scale-out: torchrun environment, batch sharding, sweeps, and DDP training equal to one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resviz.storage.checkpoints import load_checkpoint
from resviz.storage.rundirs import load_run
from resviz.train import distributed
from resviz.train.headless import RunSpec, train_to_dir
from resviz.train.records import StepRecord

ROOT = Path(__file__).resolve().parents[1]
# GroupNorm: BatchNorm would normalise each rank's half batch on its own (SyncBatchNorm needs a GPU).
TINY_RUN = {
    "net": {"depth": 8, "width": 4, "input_size": 16, "block": {"norm": "group"}},
    "train": {"batch_size": 32, "max_steps": 4, "epochs": 1, "lr": 0.05, "seed": 0, "device": "cpu", "probe_every": 0},
    "data": {"name": "shapes", "train_size": 256, "test_size": 64},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_env_info_reads_torchrun_variables() -> None:
    assert distributed.env_info({}) == distributed.DistInfo(0, 1, 0)
    info = distributed.env_info({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.enabled, info.is_main) == (1, 2, 1, True, False)
    with pytest.raises(ValueError, match="inconsistent"):
        distributed.env_info({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="integers"):
        distributed.env_info({"RANK": "x"})


def test_shards_tile_the_global_batch() -> None:
    x = torch.arange(12)
    parts = [distributed.shard(x, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), x) and all(len(p) == 4 for p in parts)
    with pytest.raises(ValueError, match="evenly"):
        distributed.shard(x, 0, 5)


def test_sweep_alone_is_a_plain_loop_and_init_is_a_no_op() -> None:
    assert distributed.init_distributed("cpu") == distributed.DistInfo()
    assert distributed.sweep([1, 2, 3], lambda v: v * 10) == [10, 20, 30]
    assert distributed.is_main()


def test_distributed_trainer_refuses_without_a_process_group() -> None:
    from resviz.data.datasets import load_dataset
    from resviz.train.trainer import build_nets

    spec = RunSpec.from_dict(TINY_RUN)
    data = load_dataset("shapes", input_size=16, train_size=64, test_size=16)
    with pytest.raises(RuntimeError, match="process group"):
        distributed.DistributedTrainer(build_nets(spec.net), data, spec.train)


def test_two_process_ddp_run_matches_one_process(tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo) ends with the weights and losses of one process on the same global batch."""
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(TINY_RUN))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "resviz", "--threads", "1", "--quiet", "train", "--config", str(cfg), "--out", str(tmp_path / "ddp")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    single = train_to_dir(RunSpec.from_dict(TINY_RUN), tmp_path / "one")  # runs while the two processes start
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert out.count("status: finished") == 1, "only rank 0 prints"
    ddp = load_run(tmp_path / "ddp")
    assert ddp.config["world_size"] == 2 and ddp.summary["world_size"] == 2 and len(ddp.metrics) == 4
    for name in ("residual", "plain"):
        a, b = load_checkpoint(tmp_path / "one" / name)[0].state_dict(), load_checkpoint(tmp_path / "ddp" / name)[0].state_dict()
        assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5
        for key in ("loss", "test_loss", "grad_norm"):
            assert ddp.summary["final"][name][key] == pytest.approx(single["final"][name][key], rel=1e-4)
    ddp_records = [StepRecord.from_json(r) for r in ddp.metrics]
    losses = [r.nets["residual"].loss for r in ddp_records]
    one = [StepRecord.from_json(r) for r in load_run(tmp_path / "one").metrics]
    assert losses == pytest.approx([r.nets["residual"].loss for r in one], rel=1e-4)


@pytest.mark.slow
def test_sweep_over_two_processes_gathers_the_same_result(tmp_path: Path) -> None:
    """The degradation study's depths split over 2 ranks; rank 0 gathers exactly the one-process result."""
    from resviz.experiments.runner import run_study

    sets = ["depths=[8,14]", "steps=3", "width=4", "train_size=128", "test_size=32", "train_eval=32"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "resviz", "--threads", "1", "--quiet", "study", "degradation", "--budget", "small", "--json", "--no-figures",
           *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    overrides = {"depths": (8, 14), "steps": 3, "width": 4, "train_size": 128, "test_size": 32, "train_eval": 32}
    alone = run_study("degradation", overrides=overrides)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    gathered = json.loads(out)
    for r in (alone, gathered):
        r.pop("time_s")
    assert gathered == alone
