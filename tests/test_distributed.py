"""rlrr/distributed.py: rank and world from torchrun's variables, else SLURM's."""
from rlrr.distributed import DistInfo, broadcast_object
from rlrr.world import World, world_from_env


def test_slurm_variables_are_the_fallback_for_rank_and_world(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert world_from_env() == World(0, 0, 1)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert world_from_env() == World(5, 1, 8)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert world_from_env() == World(2, 0, 4)  # torchrun's variables win


def test_a_single_process_needs_no_process_group():
    info = DistInfo()
    assert info.is_main and not info.enabled and broadcast_object(info, {"a": 1}) == {"a": 1}
