"""
What the scripts share: devices and precision, processes, output folders and checkpoints, flags,
the optimizer step, the memory plan, how a script ends, and the trainers' common code.
"""
import argparse
import inspect
import json
import math
import os
import signal
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._pytree import tree_flatten, tree_unflatten

from tatitok import UserError, load_state_dict_file

# -----------------------------------------------------------------------------
# devices, precision, output folders, checkpoints, flags

def make_out_dir(path):
    # a file written into it, not os.access: that says yes to root everywhere
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out_dir {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UserError(f"--out_dir {path} cannot be written ({e.strerror})") from None

def write_atomic(path, write):
    """write(a temporary path), then a rename: the file is whole or absent, no temporary left."""
    tmp = path + '.tmp'
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

def save_checkpoint(ckpt, path):
    write_atomic(path, lambda tmp: torch.save(ckpt, tmp))

def pick_device(name):
    # 'auto' and 'cuda': this process's GPU (cuda:LOCAL_RANK under torchrun)
    if name == 'auto' and not torch.cuda.is_available():
        name = 'cpu'
    if name in ('auto', 'cuda'):
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not auto, cpu, cuda, cuda:1 or mps") from None
    if device.type not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f"--device {name!r}: only cpu, cuda and mps are supported")
    count = torch.cuda.device_count()
    if device.type == 'cuda' and not 0 <= (device.index or 0) < count:  # cuda:999 wraps below 0
        raise ValueError(f"--device {name}: torch sees {count} CUDA GPU(s) here (--device cpu?)")
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine (--device cpu?)")
    return device

def use_device(device):
    # set before the first CUDA call, so no rank makes a context on GPU 0; TF32 for the fp32 parts
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device

def init_distributed(device_name):
    # -> (rank, world_size, device), in the process group under torchrun
    rank = int(os.environ.get('RANK', 0))
    world = int(os.environ.get('WORLD_SIZE', 1))
    device = use_device(pick_device(device_name))
    if world > 1:  # an hour: the other ranks wait while rank 0 writes a 20 GB checkpoint
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        dist.init_process_group(backend, timeout=timedelta(hours=1))
    return rank, world, device

DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}

def pick_dtype(name, device):
    if name == 'auto' and device.type == 'cuda':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == 'auto':
        return torch.float32
    if name == 'float16' and device.type != 'cuda':
        raise ValueError("--dtype float16 needs a CUDA GPU: use bfloat16 or float32")
    return DTYPES[name]

def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

# bf16 dense tensor-core peaks, matched in order: PCIe and NVL before the H100 in their names
PEAK_FLOPS = [('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12), ('H200', 989e12),
              ('A100', 312e12)]

def peak_flops(device):
    # inf for a CPU or an unknown GPU, so MFU reads 0 rather than a guess
    if device.type != 'cuda':
        return float('inf')
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), float('inf'))

def get_lr(step, peak, warmup, total, end, schedule='cosine'):
    # the release's (utils/lr_schedulers.py): linear warm-up, then cosine to `end`, or constant
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == 'constant':
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * progress))

def all_gather_objects(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out

def open_checkpoint(out_dir, resume, script, config, model_keys):
    """-> (the checkpoint to continue or None, {flag: (saved, now)} changed). A run is never
    overwritten without --resume, nor continued by the other script or with other `model_keys`."""
    path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        return None, {}
    if not resume:
        raise UserError(f"{path} exists: pass --resume to continue that run, or choose another "
                        f"--out_dir")
    ckpt = load_state_dict_file(path)
    if ckpt.get('script') != script:
        raise UserError(f"{path} was not written by {script}.py: choose another --out_dir")
    saved = ckpt['config']
    other = {k: (saved.get(k), config[k]) for k in model_keys if saved.get(k) != config[k]}
    if other:
        raise UserError(f"{path} trains another model ({other}, saved vs now): resume with the "
                        f"flags it was started with, or choose another --out_dir")
    changed = {k: (v, config.get(k)) for k, v in saved.items()
               if k != 'resume' and config.get(k) != v}
    return ckpt, changed

def number(kind=float, low=None, high=None, above=None, off=None):
    """An argparse type: a finite `kind` in [low, high] and over `above`, or `off` (--lr nan or
    --batch_size 0 stop at once, exit 2)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value == off:
            return value
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r}: a finite number is wanted")
        for bad, want in ((low is not None and value < low, f"at least {low}"),
                          (high is not None and value > high, f"at most {high}"),
                          (above is not None and value <= above, f"over {above}")):
            if bad:
                if off is not None:
                    want += f", or {off} (off)"
                raise argparse.ArgumentTypeError(f"{text!r}: {want} is wanted")
        return value
    return parse

def add_system_flags(parser, model, draws):
    # model: what is compiled and autocast; draws: what else --seed seeds
    g = parser.add_argument_group('system')
    g.add_argument('--resume', action='store_true', help="continue the run in --out_dir")
    g.add_argument('--device', default='auto',
                   help="auto (this process's GPU, else the CPU), cpu, cuda, cuda:1, mps")
    g.add_argument('--dtype', default='auto', choices=['auto', 'bfloat16', 'float16', 'float32'],
                   help=f"autocast dtype of the {model} (auto: bfloat16 on a GPU, float32 on "
                   "the CPU); the losses stay fp32")
    g.add_argument('--compile', default='auto', choices=['auto', 'on', 'off'],
                   help=f"torch.compile the {model} (auto: on for CUDA)")
    g.add_argument('--seed', type=number(int, 0), default=42,
                   help=f"seed of the init, the data order and {draws} (default 42)")
    g.add_argument('--max_nonfinite', type=number(int, 1), default=20,
                   help="stop after this many non-finite steps in a row, counted at log lines "
                   "(default 20)")
    g.add_argument('--checkpointing', choices=['auto', 'on', 'off'], default='auto',
                   help="recompute each transformer block in the backward pass (auto: where the "
                   "memory plan needs it)")
    g.add_argument('--zero', choices=['auto', 'on', 'off'], default='auto',
                   help="split AdamW's state over the processes (ZeroRedundancyOptimizer; auto: "
                   "where the memory plan needs it)")

# -----------------------------------------------------------------------------
# processes

def micro_batches(batch_size, ceiling, world):
    """-> (micro batch, accumulation steps): the global batch is fixed, so any number of
    processes trains the same model; the micro batch: the largest divisor of a process's share
    up to `ceiling`."""
    if batch_size % world:
        raise UserError(f"--batch_size {batch_size} cannot be split over {world} processes: "
                        f"give a multiple of {world}")
    per_rank = batch_size // world
    limit = min(ceiling or per_rank, per_rank)
    mb = max(d for d in range(1, limit + 1) if per_rank % d == 0)
    return mb, per_rank // mb

def to_device(x, device):
    # from pinned memory, asynchronously: a blocking copy would wait for the GPU's queue
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if not torch.is_tensor(x) or device.type != 'cuda':
        return x
    if not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)

def on_rank0(fn, world, errors):
    """fn() on rank 0 alone, its result (or its error, one of `errors`) on every rank: ranks that
    see different files agree on whether to resume, and from which step."""
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
    """A nested state (an optimizer's state_dict) rank 0 alone read, on every rank's `device`:
    its layout as an object, then each tensor."""
    if world == 1:
        return state
    box, mine = [None, None], None
    if dist.get_rank() == 0:
        mine, spec = tree_flatten(state)
        box = [spec, [(tuple(x.shape), x.dtype) if torch.is_tensor(x) else x for x in mine]]
    dist.broadcast_object_list(box, src=0)
    spec, leaves = box  # a tensor's leaf is (shape, dtype): no pytree leaf is a tuple
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
    # -> (gnorm, finite); a step with non-finite gradients is skipped on the device
    scaler.unscale_(opt)
    gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    finite = torch.isfinite(gnorm)  # the same on every rank: the gradients are all-reduced
    if not scaler.is_enabled():  # fused AdamW skips its update, step count too, where found_inf
        getattr(opt, 'optim', opt).found_inf = (~finite).float()  # (sharded: the AdamW inside)
    scaler.step(opt)  # float16: the scaler finds the non-finite gradients itself
    scaler.update()
    return gnorm, finite

def shard_optimizer(opt):
    # the same AdamW, its state split over the processes (ZeRO-1)
    from torch.distributed.optim import ZeroRedundancyOptimizer
    known = inspect.signature(type(opt)).parameters  # its defaults hold decoupled_weight_decay too
    defaults = {k: v for k, v in opt.defaults.items() if k in known}
    return ZeroRedundancyOptimizer(opt.param_groups, optimizer_class=type(opt), **defaults)

def optimizer_state(opt):
    # all of it on rank 0 (sharded: every rank calls this to gather it); loads sharded or not
    if hasattr(opt, 'consolidate_state_dict'):
        opt.consolidate_state_dict(to=0)
        if dist.get_rank() != 0:
            return None
    return opt.state_dict()

def stop_if_nonfinite(run, limit, out_dir, master):
    # at a log line: `run` non-finite steps in a row were skipped
    if run and master:
        print(f"the last {run} steps were skipped: a non-finite loss or gradient", flush=True)
    if run >= limit:
        if master:
            print(f"stopping: {run} non-finite steps in a row (lower --lr, or --dtype float32); "
                  f"the last good checkpoint is in {out_dir}", file=sys.stderr)
        sys.exit(1)

@torch.no_grad()
def update_ema(ema, model, step, decay, finite):
    # the release's EMAModel, decay warmed up; a skipped step leaves it; no buffer changes
    d = min(decay, (1 + step) / (10 + step))
    ema_params = list(ema.parameters())
    weight = [(1 - d) * finite.float()] * len(ema_params)  # a tensor: a scalar would sync
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], weight)

# -----------------------------------------------------------------------------
# the memory plan: what a training step holds on each GPU, known before allocating it

GiB = 2 ** 30

def memory_plan(model, act, frozen, micro_batch, world, checkpointing, zero):
    """Bytes per GPU at a training step's peak: fp32 weights, gradients (DDP's buckets are views
    of them), AdamW's state (split with zero), the EMA; `frozen`, all else on the GPU; 16-bit
    weight copies; a micro batch's activations and largest temporary (act: activation_bytes())."""
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    per_sample = act['checkpointed'] if checkpointing else act['saved']
    optimizer = 8 * P + 4 * len(params)  # exp_avg and exp_avg_sq in fp32, a step per tensor
    if zero:
        optimizer = math.ceil(optimizer / world)
    return dict(weights=4 * P, grads=4 * P, optimizer=optimizer, ema=4 * P, frozen=frozen,
                casts=act['casts'], activations=micro_batch * (per_sample + act['transient']))

def choose_plan(model, act, frozen, batch_size, ceiling, world, memory, checkpointing='auto',
                zero='auto'):
    """-> dict(micro_batch, grad_accum, checkpointing, zero, plan) on GPUs of `memory` bytes
    (None: a CPU, no plan): the largest micro batch whose plan fits in 90%. Checkpointing only
    when no quarter of the recipe's micro batch fits without, zero when nothing fits without."""
    mb, _ = micro_batches(batch_size, ceiling, world)
    per_rank = batch_size // world
    sizes = [d for d in range(mb, 0, -1) if per_rank % d == 0]  # largest first
    levers = [(c, z) for z in (False, True) for c in (False, True)
              if checkpointing in ('auto', ('off', 'on')[c]) and zero in ('auto', ('off', 'on')[z])
              and (world > 1 or not z)]
    for c, z in levers:
        for size in sizes:
            plan = memory_plan(model, act, frozen, size, world, c, z)
            small = not c and not z and checkpointing == 'auto' and size * 4 < mb
            if memory is None or (sum(plan.values()) <= 0.9 * memory and not small):
                return dict(micro_batch=size, grad_accum=per_rank // size, checkpointing=c,
                            zero=z, plan=plan)
    smallest = memory_plan(model, act, frozen, 1, world, *levers[-1])
    raise UserError(f"nothing fits in {memory / GiB:.1f} GiB per GPU: a micro batch of 1 with "
                    f"{describe(levers[-1])} plans {sum(smallest.values()) / GiB:.1f} GiB (a "
                    f"smaller model, more processes with --zero on, or larger GPUs)")

def describe(levers):
    checkpointing, zero = levers
    return f"checkpointing {('off', 'on')[checkpointing]}, zero {('off', 'on')[zero]}"

def plan_lines(choice, memory):
    plan = choice['plan']
    parts = ', '.join(f"{k} {v / GiB:.1f}" for k, v in plan.items())
    return (f"memory plan per GPU (GiB): {parts}; total {sum(plan.values()) / GiB:.1f} of "
            f"{memory / GiB:.1f} (fits with 10% headroom) at micro batch {choice['micro_batch']}, "
            f"{describe((choice['checkpointing'], choice['zero']))}")

# -----------------------------------------------------------------------------
# how a script ends: a user error or an interrupt in one line, never a traceback

class Interrupted(BaseException):
    """Ctrl-C or SIGTERM (code 128 + the signal); as KeyboardInterrupt, no `except Exception`
    swallows it."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code

def _interrupt(signum, frame):
    raise Interrupted(128 + signum)

def interrupted_at(step, saved, out_dir):
    where = "no checkpoint yet"
    if saved is not None:
        where = f"the last checkpoint is step {saved}, in {out_dir}/ckpt.pt"
    return f"interrupted at step {step}: {where}"

def run_main(main, args, errors):
    """main(args, state): one of `errors` ends in one line and exit 2; Ctrl-C or SIGTERM in
    state['interrupted']()'s line (what is on disk) and exit 130 or 143. Rank 0 alone prints."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    state = dict(interrupted=lambda: "interrupted: nothing written")
    quiet = os.environ.get('RANK', '0') != '0'
    try:
        main(args, state)
    except errors as e:
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        if not quiet:
            print(state['interrupted'](), file=sys.stderr)
        sys.exit(e.code)
    finally:  # a process group left to the interpreter's exit can abort it (SIGABRT, not exit 2)
        if dist.is_initialized():
            dist.destroy_process_group()

# -----------------------------------------------------------------------------
# a training run, as both trainers open, restore, save and log it

def start_run(args):
    # a batch that cannot be split over the processes stops here
    rank, world, device = init_distributed(args.device)
    dtype = pick_dtype(args.dtype, device)
    micro_batches(args.batch_size, args.micro_batch_size, world)
    return rank, world, device, dtype, autocast(device, dtype)

def open_run(args, script, model_flags, world):
    """Rank 0 alone decides whether to resume and reads the checkpoint -> (the checkpoint, None on
    the other ranks and for a new run; the flags changed; what every rank needs of it, or None)"""
    found = {}

    def decide():
        make_out_dir(args.out_dir)
        ckpt, changed = open_checkpoint(args.out_dir, args.resume, script, vars(args), model_flags)
        found['ckpt'] = ckpt
        keys = ('model_args', 'text_encoder', 'tokenizer', 'step', 'nonfinite', 'data')
        return changed, ckpt and {k: ckpt[k] for k in keys if k in ckpt}
    changed, resumed = on_rank0(decide, world, UserError)
    return found.get('ckpt'), changed, resumed

def restore(parts, ckpt, resumed, world, device):
    """parts: {checkpoint key: a module, tensor, optimizer or GradScaler}, made rank 0's (resumed
    or initial) on every rank -> (first step, non-finite steps so far)"""
    for k, part in parts.items():
        if isinstance(part, torch.nn.Module):
            if ckpt:
                part.load_state_dict(ckpt[k])
            tensors = part.state_dict().values()
        elif torch.is_tensor(part):
            if ckpt:
                part.copy_(ckpt[k])
            tensors = [part]
        else:  # nested state: rank 0 alone read it
            if resumed:
                part.load_state_dict(broadcast_state(ckpt and ckpt[k], device, world))
            tensors = []
        if world > 1:
            for t in tensors:
                dist.broadcast(t, 0)
    step, nonfinite = (resumed['step'], resumed['nonfinite']) if resumed else (0, 0)
    return step, torch.tensor(nonfinite, device=device)

def wrap(model, device, world, compile='off'):
    if compile == 'on' or (compile == 'auto' and device.type == 'cuda'):
        model = torch.compile(model)
    if world > 1:
        device_ids = [device.index] if device.type == 'cuda' else None
        model = DDP(model, device_ids=device_ids, gradient_as_bucket_view=True,
                    broadcast_buffers=False)  # training changes no buffer
    return model

def gpu_memory(device):
    # None on the CPU: no memory plan
    if device.type == 'cuda':
        return torch.cuda.get_device_properties(device).total_memory
    return None

def print_start(config, choice, loader, memory, changed, step):
    print(json.dumps(config, indent=1))
    print(f"global batch {config['batch_size']} = {choice['micro_batch']} per forward x "
          f"{config['world_size']} processes x {choice['grad_accum']} accumulation; data: "
          f"{loader.stream.streams} streams, {loader.stream.num_workers} workers per process")
    if memory:
        print(plan_lines(choice, memory))
    if changed:
        print(f"resuming at step {step} with changed flags (saved, now): {changed}")

def save_run(args, step, world, parts, **extra):
    # every rank calls it; rank 0 writes while the others wait
    ckpt = dict(extra, config=vars(args), step=step)
    for k, part in parts.items():
        if torch.is_tensor(part):
            ckpt[k] = part.cpu()
        elif isinstance(part, torch.optim.Optimizer):
            ckpt[k] = optimizer_state(part)
        else:
            ckpt[k] = part.state_dict()
    path = os.path.join(args.out_dir, 'ckpt.pt')
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_checkpoint(ckpt, path)
        print(f"saved {path} (step {step})", flush=True)
    if world > 1:  # within the process group's timeout, sized for it
        dist.barrier()

def log_step(args, row, head, tail, clock, flops, device, world):
    # rank 0's log line, `row` also appended to metrics.jsonl; clock: [time, step] of the last
    if device.type == 'cuda':
        torch.cuda.synchronize()
    step = row['step']
    dt = (time.time() - clock[0]) / (step + 1 - clock[1])
    clock[:] = time.time(), step + 1
    mfu = flops / dt / (peak_flops(device) * world)
    print(f"step {step}/{args.max_steps} | {head} | gnorm {row['gnorm']:.3g} | "
          f"lr {row['lr']:.2e} | dt {dt * 1000:.0f}ms | img/s {args.batch_size / dt:.1f} | "
          f"mfu {100 * mfu:.1f}% | {tail}", flush=True)
    with open(os.path.join(args.out_dir, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps(row) + '\n')

# -----------------------------------------------------------------------------
# the flags both trainers have, in groups each adds its own to

OFFICIAL_TOKENS = ('vq32', 'vq64', 'vq128', 'kl32', 'kl64', 'kl128')

def add_training_flags(p, what):
    # -> {title: group}, for each trainer to add its own; what: a batch's items
    p.description += " A flag with no default shown takes the recipe's."
    pos, pos_int = number(float, 0), number(int, 1)
    g = {t: p.add_argument_group(t) for t in ('model', 'data', 'optimization', 'output')}
    m, o, out = g['model'], g['optimization'], g['output']
    m.add_argument('--tokens',
                   help=f"a tokenizer release and its recipe, {'|'.join(OFFICIAL_TOKENS)}; "
                        f"with --preset: vq or kl (default vq)")
    m.add_argument('--preset', choices=['shapes', 'tiny'],
                   help="a small recipe instead: shapes (the CPU quickstart, 32 px), tiny "
                        "(the tests)")
    g['data'].add_argument('--num_workers', type=number(int, 0),
                           help="data loader processes per GPU")
    o.add_argument('--batch_size', type=pos_int,
                   help=f"the GLOBAL batch: {what} per optimizer step, all processes")
    o.add_argument('--micro_batch_size', type=pos_int,
                   help=f"at most this many {what} per process per forward (a divisor of its "
                        f"share); the rest is gradient accumulation")
    o.add_argument('--max_steps', type=pos_int, help="optimizer steps (the cosine's length)")
    o.add_argument('--lr', type=pos, help="peak learning rate")
    o.add_argument('--end_lr', type=pos, help="learning rate at the end of the cosine decay")
    o.add_argument('--warmup_steps', type=number(int, 0), help="linear warm-up steps")
    o.add_argument('--weight_decay', type=pos,
                   help="AdamW weight decay (not on norms, biases, embeddings)")
    o.add_argument('--beta1', type=number(float, 0, 0.9999), default=0.9,
                   help="AdamW beta1 (default 0.9)")
    o.add_argument('--beta2', type=number(float, 0, 0.9999), help="AdamW beta2")
    o.add_argument('--grad_clip', type=pos, default=1.0, help="max gradient norm (default 1.0)")
    o.add_argument('--ema_decay', type=number(float, 0, 1), default=0.999,
                   help="EMA decay, after the release's warm-up (default 0.999)")
    out.add_argument('--out_dir', help="where ckpt.pt, metrics.jsonl and the image grids go")
    out.add_argument('--log_every', type=pos_int, help="steps between log lines")
    out.add_argument('--ckpt_every', type=pos_int,
                     help="steps between checkpoints (and one at the end)")
    return g

def check_tokens(p, args):
    if args.preset is None and args.tokens not in OFFICIAL_TOKENS:
        p.error(f"pass --tokens {'|'.join(OFFICIAL_TOKENS)} (an official recipe) or --preset "
                f"shapes (CPU quickstart)")
    if args.preset:
        args.tokens = args.tokens or 'vq'
        if args.tokens not in ('vq', 'kl'):
            p.error(f"--preset {args.preset} takes --tokens vq or kl, not {args.tokens!r}")

def take_recipe(p, args, recipe):
    # a device or dtype this machine lacks stops here, exit 2
    for k, v in recipe.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    try:
        pick_dtype(args.dtype, pick_device(args.device))
    except ValueError as e:
        p.error(str(e))
    return args
