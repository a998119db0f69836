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
