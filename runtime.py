"""
What the training scripts share to run on 1 to 64 processes: the split of the global batch, one
process's decisions for all, the optimizer step that never waits on the host, and the memory plan.
"""
import math

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten

from tatitok import CheckpointError

# -----------------------------------------------------------------------------
# processes


def micro_batches(batch_size, ceiling, world):
    """-> (samples per process per forward, accumulation steps). The global batch is fixed, so any
    number of processes trains the same model: each takes batch_size / world samples a step, in the
    largest micro batch at most `ceiling` (None: all at once) that divides them evenly."""
    if batch_size % world:
        raise CheckpointError(f"--batch_size {batch_size} cannot be split over {world} processes: give a "
                         f"multiple of {world}")
    per_rank = batch_size // world
    limit = min(ceiling or per_rank, per_rank)
    mb = max(d for d in range(1, limit + 1) if per_rank % d == 0)
    return mb, per_rank // mb


def on_rank0(fn, world, errors):
    """fn() on rank 0 alone, its result on every rank: one process decides for all (whether to
    resume, from which step), so ranks that see different files still agree. A user error raised by
    fn (one of `errors`) is raised on every rank, with rank 0's message."""
    out = [None, None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            out[0] = fn()
        except errors as e:
            out[1] = (type(e), str(e))
    if world > 1:
        dist.broadcast_object_list(out, src=0)
    if out[1]:
        raise out[1][0](out[1][1])
    return out[0]


def broadcast_state(state, device, world):
    """A nested state (an optimizer's state_dict) from rank 0 to every rank: its layout as an object,
    then each tensor on `device` (rank 0 alone read the checkpoint). -> the state, on every rank."""
    if world == 1:
        return state
    box, mine = [None, None], None
    if dist.get_rank() == 0:
        mine, spec = tree_flatten(state)
        box = [spec, [(tuple(x.shape), x.dtype) if torch.is_tensor(x) else x for x in mine]]
    dist.broadcast_object_list(box, src=0)
    spec, leaves = box  # a tensor's leaf is (shape, dtype): pytree leaves are never tuples
    out = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, tuple):
            t = torch.empty(leaf[0], dtype=leaf[1], device=device)
            if mine is not None:
                t.copy_(mine[i])
            dist.broadcast(t, 0)
            leaf = t
        out.append(leaf)
    return tree_unflatten(out, spec)


# -----------------------------------------------------------------------------
# the optimizer step, never waiting on the host


def optimizer_step(opt, scaler, params, grad_clip):
    """Clip the gradients and step, or skip a step whose gradients are not finite, all on the device:
    the host never waits for the GPU. -> (gradient norm, finite), both tensors."""
    scaler.unscale_(opt)
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    finite = torch.isfinite(gnorm)  # the same on every rank: the gradients are all-reduced
    if not scaler.is_enabled():  # fused AdamW skips its update, step count included, where found_inf
        opt.found_inf = (~finite).float()
    scaler.step(opt)  # float16: the scaler finds the non-finite gradients itself
    scaler.update()
    return gnorm, finite


@torch.no_grad()
def update_ema(ema, model, step, decay, finite):
    """The release's EMA of the weights (EMAModel): decay warmed up as (1 + step) / (10 + step), at most
    `decay`; a skipped step (finite False) leaves it as it is. Parameters only: neither model has a
    buffer that training changes."""
    d = min(decay, (1 + step) / (10 + step))
    ema_params = list(ema.parameters())
    weight = [(1 - d) * finite.float()] * len(ema_params)  # a tensor per tensor: a scalar one syncs
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], weight)
