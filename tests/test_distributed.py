"""Data-parallel training with torchrun: the sharding, the refusals, and real runs of 1 and 2
processes (gloo on the CPU) through the stage script and through `dvc repro`, killed and
resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from mnist_pipeline.distributed import (
    SINGLE,
    World,
    check_world,
    choose_backend,
    plain_batchnorm,
    rank_seed,
    shard,
    threads_per_rank,
    world_from_env,
)
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.model import MnistCNN
from mnist_pipeline.params import ParamsError, TrainParams, parse_section

from .conftest import ROOT, VENV_BIN, clean_env, copy_project, load_real, mnist_mirror, run

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


# --- Pure functions ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3])
def test_every_image_once_per_epoch_for_any_world_size(size):
    n, batch = 100, 12  # 8 full batches; the last 4 images are dropped, as in one process
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    steps = n // batch
    seen = []
    for step in range(steps):
        parts = [shard(order, step, batch, World(rank=r, size=size)) for r in range(size)]
        assert all(len(part) == batch // size for part in parts)
        # the ranks together take exactly the global batch that one process would take
        assert torch.equal(torch.cat(parts), order[step * batch : (step + 1) * batch])
        seen += torch.cat(parts).tolist()
    assert sorted(seen) == sorted(order[: steps * batch].tolist())
    assert len(set(seen)) == len(seen)


def test_world_from_env():
    assert world_from_env({}) == SINGLE
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    world = world_from_env(env)
    assert (world.rank, world.size, world.local_rank, world.local_size) == (3, 4, 1, 2)
    assert not world.is_main and world.backend is None


def test_refusals_name_the_param():
    with pytest.raises(PipelineError, match=r"train\.batch_size: 100 .* 3 processes"):
        check_world(100, False, 3, 3, CPU, 0)
    with pytest.raises(PipelineError, match=r"train\.nproc: 4 processes .* 2 CUDA GPU"):
        check_world(100, False, 4, 4, CUDA, 2)
    with pytest.raises(PipelineError, match=r"train\.compile"):
        check_world(100, True, 2, 2, CPU, 0)
    check_world(100, False, 4, 2, CUDA, 2)  # 2 machines x 2 GPUs
    check_world(100, True, 1, 1, CPU, 0)
    with pytest.raises(ParamsError, match=r"train\.batch_size: 100 .* train\.nproc=3"):
        TrainParams(nproc=3)
    with pytest.raises(ParamsError, match=r"train\.nproc: expected an integer >= 1"):
        parse_section("train", {"nproc": 0}, TrainParams)
    assert TrainParams(nproc=4).batch_size // 4 == 25


def test_backend_choice():
    assert choose_backend("auto", CPU) == "gloo" and choose_backend("auto", CUDA) == "nccl"
    assert choose_backend("gloo", CUDA) == "gloo"
    with pytest.raises(PipelineError, match="'nccl' needs CUDA"):
        choose_backend("nccl", CPU)
    with pytest.raises(PipelineError, match="MNIST_DIST_BACKEND"):
        choose_backend("mpi", CPU)


def test_threads_never_exceed_the_cores():
    assert threads_per_rank(0, 1, 2) == (2, None)
    assert threads_per_rank(0, 2, 2) == (1, None)
    assert threads_per_rank(0, 4, 2) == (1, None)  # at least one each
    assert threads_per_rank(0, 2, 16) == (8, None)
    count, note = threads_per_rank(2, 2, 2)
    assert count == 1 and "exceed the 2 cores" in note
    assert threads_per_rank(3, 2, 8) == (3, None)


def test_rank_seeds_differ():
    seeds = {rank_seed(0, rank) for rank in range(8)} | {rank_seed(1, 0)}
    assert len(seeds) == 9


def test_sync_batchnorm_weights_export_as_plain_batchnorm():
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(MnistCNN())
    with torch.no_grad():
        for p in synced.parameters():
            p.add_(torch.randn_like(p))
    plain = plain_batchnorm(synced, MnistCNN)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                   synced.state_dict().values(), strict=True))
    model = MnistCNN()
    assert plain_batchnorm(model, MnistCNN) is model


# --- The stage script under torchrun --------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from mnist_pipeline.download import download

    folder = tmp_path_factory.mktemp("ddp_inputs")
    download(folder / "raw", [str(mnist_mirror())])
    (folder / "stats.json").write_text(json.dumps({"mean": 0.1307, "std": 0.3081}))
    return folder


def _stage(inputs: Path, out: Path, **train: object) -> list[str]:
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["train"].update({"epochs": 1, "train_subset": 600, **train})
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(doc))
    return [str(VENV_BIN / "python"), str(ROOT / "stages" / "train.py"),
            "--params", str(out / "params.yaml"), "--raw", str(inputs / "raw"),
            "--stats", str(inputs / "stats.json"), "--weights", str(out / "model.pt"),
            "--metrics", str(out / "train.json"), "--history", str(out / "history.json"),
            "--run-info", str(out / "run.json"), "--checkpoint", str(out / "ckpt.pt")]


@pytest.mark.e2e
def test_world_size_one_under_torchrun_is_byte_identical(inputs, tmp_path):
    """One process under torchrun (gloo, DDP) trains exactly as the plain stage does."""
    plain = run(_stage(inputs, tmp_path / "plain"), tmp_path / "plain", clean_env())
    ddp = run(_stage(inputs, tmp_path / "ddp"), tmp_path / "ddp",
              clean_env(MNIST_TORCHRUN_ARGS="--standalone"))
    assert "Launching:" not in plain.stdout and "Launching:" in ddp.stdout
    assert ((tmp_path / "plain" / "model.pt").read_bytes()
            == (tmp_path / "ddp" / "model.pt").read_bytes())


@pytest.mark.e2e
@pytest.mark.parametrize(("train", "env", "message"), [
    ({"nproc": 3}, {}, r"train\.batch_size: 100 images per step do not divide"),
    ({"nproc": 0}, {}, r"train\.nproc: expected an integer >= 1"),
    ({"nproc": 2}, {"MNIST_DIST_BACKEND": "nccl"}, r"'nccl' needs CUDA GPUs"),
    ({"nproc": 2, "compile": True}, {}, r"train\.compile: not supported"),
])
def test_bad_launches_are_refused_before_any_work(inputs, tmp_path, train, env, message):
    import re

    done = run(_stage(inputs, tmp_path, **train), tmp_path, clean_env(**env), check=False)
    assert done.returncode == 1 and re.search(message, done.stderr), done.stderr
    assert "Traceback" not in done.stderr and "Launching" not in done.stdout
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "mlruns").exists()


# --- Two processes through dvc repro: one run, resume after a killed rank -------------------

# (without test-time augmentation, which only the exported model does: 5x quicker to score)
DDP_TRAIN = {"epochs": 2, "train_subset": 6000, "tta": False}


def _set_train(repo: Path, **values: object) -> None:
    doc = yaml.safe_load((repo / "params.yaml").read_text())
    doc["train"].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.fixture(scope="module")
def ddp_pipeline(tmp_path_factory):
    """A project copy run with `dvc repro` at world size 1, then at world size 2."""
    env = clean_env(MNIST_MIRROR=str(mnist_mirror()))
    repo = copy_project(tmp_path_factory.mktemp("ddp") / "repo", env)
    _set_train(repo, **DDP_TRAIN, nproc=1)
    run(["dvc", "repro"], repo, env)
    one = json.loads((repo / "metrics" / "evaluate.json").read_text())
    _set_train(repo, nproc=2)
    log = run(["dvc", "repro"], repo, env)
    return repo, env, one, log, (repo / "models" / "model.pt").read_bytes()


def _client(repo: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")


@pytest.mark.e2e
def test_two_processes_make_one_run_one_version(ddp_pipeline):
    repo, _, one, log, _ = ddp_pipeline
    assert "--nproc-per-node=2" in log.stdout
    assert log.stdout.count("Epoch: 1,") == 1 and log.stdout.count("Registered ") == 1
    info = json.loads((repo / "models" / "run.json").read_text())
    client = _client(repo)
    run_ = client.get_run(info["run_id"])
    assert run_.info.status == "FINISHED"
    assert run_.data.tags["world_size"] == "2" and run_.data.tags["distributed_backend"] == "gloo"
    assert run_.data.tags["cpu_threads"] == "1"  # 2 ranks x 1 thread on 2 cores
    assert run_.data.params["nproc"] == "2"
    for key in ("train_loss", "train_accuracy", "lr", "epoch_seconds"):
        history = client.get_metric_history(info["run_id"], f"epoch/{key}")
        assert sorted(m.step for m in history) == [1, 2]
    runs = client.search_runs([run_.info.experiment_id])
    assert len(runs) == 2  # world size 1, then 2: one run each, none per rank
    versions = client.search_model_versions(f"run_id = '{info['run_id']}'")
    assert [int(v.version) for v in versions] == [info["version"]] == [2]
    two = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert abs(two["test_accuracy"] - one["test_accuracy"]) <= 0.005, (one, two)

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(info["registry_uri"])
    images, labels = load_real("t10k", 200)
    probs = np.asarray(model.predict((images[:, None] / 255.0).astype(np.float32)))
    assert probs.shape == (200, 10) and (probs.argmax(1) == labels).mean() >= 0.9


def _rank_pid(repo: Path, rank: int) -> int | None:
    """The process of training rank `rank` working in `repo` (torchrun's LOCAL_RANK)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if f"LOCAL_RANK={rank}".encode() in environ and Path(cwd) == repo:
            return int(entry.name)
    return None


def _checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except Exception:
        return {"epoch": -1, "complete": True}


@pytest.mark.e2e
def test_killed_rank_then_repro_resumes_to_the_same_weights(ddp_pipeline):
    repo, env, _, _, straight = ddp_pipeline
    straight_run = json.loads((repo / "models" / "run.json").read_text())["run_id"]
    ckpt = repo / "checkpoints" / "train.pt"
    proc = subprocess.Popen(["dvc", "repro", "--force", "--single-item", "train"], cwd=repo,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while True:  # until the new run has finished its first epoch
        state = _checkpoint(ckpt)
        if not state["complete"] and state["epoch"] >= 1:
            break
        assert proc.poll() is None and time.monotonic() < deadline, "no epoch to kill after"
        time.sleep(0.02)
    pid = _rank_pid(repo, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    stopped = _checkpoint(ckpt)
    assert not stopped["complete"] and 1 <= stopped["epoch"] < DDP_TRAIN["epochs"]

    resumed = run(["dvc", "repro", "train"], repo, env)
    assert f"Resuming after epoch {stopped['epoch']}" in resumed.stdout
    assert (repo / "models" / "model.pt").read_bytes() == straight
    info = json.loads((repo / "models" / "run.json").read_text())
    assert info["run_id"] == stopped["run_id"] != straight_run  # the killed run, continued
    client = _client(repo)
    assert client.get_run(info["run_id"]).info.status == "FINISHED"
    resumed_loss = client.get_metric_history(info["run_id"], "epoch/train_loss")
    assert sorted(m.step for m in resumed_loss) == [1, 2]
    assert (sorted((m.step, m.value) for m in resumed_loss)
            == sorted((m.step, m.value) for m in client.get_metric_history(straight_run,
                                                                            "epoch/train_loss")))


@pytest.mark.e2e
def test_two_machines_as_documented_on_loopback(ddp_pipeline):
    """The two-machine recipe of docs/distributed.md, both "machines" on 127.0.0.1 with one
    process each: `dvc repro` on the first, the stage's own command on the second. World
    size 2 and, as the two share this machine's cores, 1 thread each: the same weights as 2
    processes of one machine (threads change the rounding)."""
    from .conftest import free_port

    repo, env, _, _, straight = ddp_pipeline
    _set_train(repo, nproc=1)
    port = free_port()

    def launch(rank: int) -> str:
        return f"--nnodes=2 --node-rank={rank} --master-addr=127.0.0.1 --master-port={port}"

    env = {**env, "MNIST_THREADS": "1"}

    stage_cmd = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["train"]["cmd"]
    second = subprocess.Popen(stage_cmd, shell=True, cwd=repo,
                              env={**env, "MNIST_TORCHRUN_ARGS": launch(1)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = run(["dvc", "repro", "train"], repo, {**env, "MNIST_TORCHRUN_ARGS": launch(0)})
        assert second.wait(timeout=120) == 0
    finally:
        second.kill()
    output = second.stdout.read()
    assert "Epoch:" not in output and "Registered" not in output  # rank 1: no output, no log
    assert first.stdout.count("Registered ") == 1
    assert (repo / "models" / "model.pt").read_bytes() == straight
    info = json.loads((repo / "models" / "run.json").read_text())
    assert _client(repo).get_run(info["run_id"]).data.tags["world_size"] == "2"


def test_torchrun_options_with_an_unclosed_quote_are_one_message():
    from mnist_pipeline.distributed import torchrun_command

    assert torchrun_command(2, "", ["train.py"])[1:3] == ["--standalone", "--nproc-per-node=2"]
    with pytest.raises(PipelineError, match="MNIST_TORCHRUN_ARGS '--nnodes=2 \"abc'"):
        torchrun_command(2, '--nnodes=2 "abc', ["train.py"])
