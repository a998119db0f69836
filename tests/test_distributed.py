"""Task boundaries, merge, save and load under FSDP2 and DDP: 2 gloo processes on CPU."""

import pytest
import torch.distributed as dist

pytest.importorskip("transformers", reason="needs transformers (pip install mbf-lora[app])")
if not dist.is_available():
    pytest.skip("this torch has no torch.distributed", allow_module_level=True)


def _spawn(fn_name: str, tmp_path) -> None:
    import torch.multiprocessing as mp
    from fixtures import dist_worker

    fn = getattr(dist_worker, fn_name)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(fn, args=(2, init, str(tmp_path / "ckpt")), nprocs=2, join=True)


def test_fsdp2_boundaries_merge_save_and_load(tmp_path):
    _spawn("fsdp2", tmp_path)


def test_ddp_replicas_agree_and_a_rank_that_skips_a_boundary_is_an_error(tmp_path):
    _spawn("ddp_and_a_skipping_rank", tmp_path)


def test_the_multi_process_example_starts_two_ranks_that_agree(tmp_path):
    """The CPU command docs/library.md shows for examples/accelerate_slao.py: 2 gloo ranks, replicas equal."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("accelerate", reason="needs accelerate (pip install accelerate)")
    example = Path(__file__).parent.parent / "examples" / "accelerate_slao.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(example), "--out", str(tmp_path / "state"), "--steps", "4"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world 2 (MULTI_CPU)" in done.stdout and "ranks agree: 2 identical replicas" in done.stdout
    assert (tmp_path / "state" / "continual.json").is_file()


def test_accelerate_launch_on_cpus_with_several_processes_refuses_to_run_one_rank(tmp_path):
    """``accelerate launch --cpu --num_processes 2`` starts one process (accelerate spreads CPU processes
    with mpirun only): the example used to train alone as "world 1"; it now stops, naming torchrun."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("accelerate", reason="needs accelerate (pip install accelerate)")
    example = Path(__file__).parent.parent / "examples" / "accelerate_slao.py"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(example), "--out", str(tmp_path / "state"), "--steps", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode != 0, done.stdout[-2000:]
    assert "started this script as one process" in done.stderr and "torchrun" in done.stderr
    assert not (tmp_path / "state").exists()  # nothing trained or saved
