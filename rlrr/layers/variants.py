"""The options of an RLRR layer and the one check of how they combine. Imports nothing from rlrr, so the
config schema (rlrr/config.py) and the layers both read it without importing each other."""
from typing import Literal, Optional

# the adapter's starting point: the reference's random one, W' = W, or auto: the reference's except on
# convolutions where it would flip weights (rlrr.adapter.conv_start)
Init = Literal["auto", "official", "identity"]
Sides = Literal["both", "out", "in"]  # which scale vectors train (the other side is fixed at ones)
Form = Literal["residual", "plain", "additive"]  # W*(1+D) | W*D | W+D with D = S_out S_in
Kernel = Literal["auto", "triton", "torch"]  # RLRRLinear's passes around the matmuls: see use_fused
LINEAR_TARGETS = ("qkv", "proj", "fc1", "fc2", "reduction")  # timm's linear names that RLRR may adapt


def variant_problem(rank, sides, targets=None, prefix: str = "") -> Optional[str]:
    """What is wrong with a rank / sides / targets combination (one line naming ``prefix``+key), or None."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        return f"{prefix}rank = {rank!r}: expected an integer >= 1"
    if sides != "both" and rank != 1:
        return f"{prefix}sides = {sides} scales rows or columns only; it needs {prefix}rank = 1, got {rank}"
    if targets is not None:
        bad = [t for t in targets if t not in LINEAR_TARGETS] if isinstance(targets, (list, tuple)) else [targets]
        if bad or not targets:
            return f"{prefix}targets = {targets!r}: expected a non-empty list of {', '.join(LINEAR_TARGETS)}"
    return None


def check_variant(rank, sides) -> None:
    """A layer's own check (ValueError); configs report the same problem as a ConfigError naming their key."""
    problem = variant_problem(rank, sides)
    if problem:
        raise ValueError(problem)
