"""
Training and sampling throughput of TA-TiTok and MaskGen, the nanoGPT bench.py way: random weights,
synthetic inputs, warm-up steps, then timed steps; a table, a JSON line last.

$ python bench.py --what sample --size l --tokens vq128 --batch_size 64  # MaskGen-L VQ, 16 steps
$ python bench.py --what sample --size l --tokens kl32 --batch_size 64   # MaskGen-L KL, 32 steps
$ python bench.py --what train-maskgen --size l --tokens vq128 --batch_size 64 --compile on
$ python bench.py --what train-tokenizer --tokens vq128 --batch_size 32
$ python bench.py --what sample --size tiny --tokens vq --batch_size 2 --sample_steps 2  # a CPU
$ python bench.py --what plan  # the memory plan of every official recipe

MFU: the model's FLOPs (2 per multiply-add, backward 2x forward) over the GPU's bf16 dense peak
(0 on a CPU or an unknown GPU). The host's ms and syncs per step show what keeps a GPU idle. The
training steps run the models alone: the tokenizer with an L2 loss, the generator on random CLIP
features. Sampling is CLIP, the generator's steps and the decoder, once more timed apart.
"""
import argparse
import copy
import json
import resource
import time
import warnings

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tatitok import TATiTok, TextEncoder, UserError, tatitok_config
from maskgen import (MaskGen, GaussianDiffusion, Sampling, maskgen_config, mask_schedule,
                     prompt_inputs)
from runtime import (pick_device, pick_dtype, autocast, peak_flops, number, optimizer_step,
                     update_ema, describe, run_main, GiB)

CLIP_L14_TEXT = dict(context_length=77, vocab_size=49408, width=768, heads=12, layers=12)
CLIP_L14_PARAMS = 123.7e6  # the official CLIP's (ViT-L-14-336) text tower
TOKENS = ['vq32', 'vq64', 'vq128', 'kl32', 'kl64', 'kl128', 'vq', 'kl']
USER_ERRORS = (UserError, torch.cuda.OutOfMemoryError)  # one line, exit 2 (runtime.run_main)

def sample_flops(gen, tok, te, batch, steps, diffusion_steps, guided):
    # per image: CLIP (and "" once a batch), the generator's conditioning, its backbone at every
    # step and the KL denoiser at every diffusion step of every token (twice if guided), decoder
    N = gen.config.num_tokens
    f = gen.estimate_flops(te.context_length)
    reps = 2 if guided else 1
    flops = te.estimate_flops() * (batch + 1) / batch + tok.estimate_flops(encode=False)
    passes = steps
    if gen.config.quantize != 'vq':
        schedule = mask_schedule(N, steps, 'cosine')
        passes = sum(a > b for a, b in zip([N] + schedule, schedule))  # steps that commit
        timesteps = len(GaussianDiffusion(1000, diffusion_steps).timestep_map)
        flops += reps * N * timesteps * f['denoiser']
    return flops + reps * (f['conditioning'] + passes * f['backbone'])

# -----------------------------------------------------------------------------
# timing: a step's parts, and what makes the host wait for the device

def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)

def time_parts(step, parts, device):
    """One more step, each method of parts [(object, method name, part)] timed -> ms per part,
    its calls summed. On a GPU the marks are CUDA events: no wait for the device added."""
    cuda = device.type == 'cuda'
    marks = []

    def now():
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def timed(fn, name):
        def call(*args, **kwargs):
            start = now()
            out = fn(*args, **kwargs)
            marks.append((name, start, now()))
            return out
        return call

    originals = [(obj, method, getattr(obj, method)) for obj, method, _ in parts]
    for obj, method, name in parts:
        setattr(obj, method, timed(getattr(obj, method), name))  # hides the class's method
    step()
    for obj, method, fn in originals:
        setattr(obj, method, fn)  # the bound method, or the compiled function, back
    sync(device)
    ms = {}
    for name, start, end in marks:
        elapsed = start.elapsed_time(end) if cuda else 1000 * (end - start)
        ms[name] = ms.get(name, 0.0) + elapsed
    return ms

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.bincount, aten.equal,
            aten.is_nonzero, aten.unique_dim, aten._unique2, aten.repeat_interleave}

class SyncCounter(TorchDispatchMode):
    """Counts the ops after which the host waits for the device: a value read (.item(),
    .tolist()), an output sized by the data (nonzero, boolean indexing...), synchronize. On a
    CPU they cost nothing: this counts what a GPU would wait for."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket
        by_mask = op in (aten.index, aten.index_put, aten.index_put_) and any(
            t is not None and t.dtype == torch.bool for t in args[1])
        if op in SYNC_OPS or by_mask:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._wrapped = torch.Tensor.tolist, torch.cuda.synchronize  # the dispatcher sees neither
        torch.Tensor.tolist = self._counted('tolist', torch.Tensor.tolist)
        torch.cuda.synchronize = self._counted('synchronize', torch.cuda.synchronize)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.cuda.synchronize = self._wrapped
        return super().__exit__(*exc)

    def _counted(self, name, fn):
        def counted(*args, **kwargs):
            self.ops.append(name)
            return fn(*args, **kwargs)
        return counted

def count_syncs(step, device):
    """One more step -> (its host syncs, the ms its kernels ran or None off CUDA). On CUDA,
    set_sync_debug_mode warns at each sync and the profiler times the kernels."""
    if device.type != 'cuda':
        with SyncCounter() as counter:
            step()
        return len(counter.ops), None
    from torch.profiler import profile, ProfilerActivity
    with warnings.catch_warnings(record=True) as caught, \
            profile(activities=[ProfilerActivity.CUDA]) as prof:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        step()
        torch.cuda.set_sync_debug_mode('default')
        sync(device)
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1000  # us -> ms
    return sum('synchroniz' in str(w.message) for w in caught), busy

# -----------------------------------------------------------------------------
# the benchmarks: each -> (step, FLOPs per image, facts for the report, a breakdown or None)

def train_step(model, opt, loss, args):
    # the trainers' step: loss(model), backward, clipping, AdamW (skipped if not finite), EMA
    model.train()
    ema = copy.deepcopy(model).requires_grad_(False)
    run = model
    if args.compile == 'on':
        run = torch.compile(model, mode=args.compile_mode)
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.dtype == torch.float16)

    def step():
        with autocast(args.device, args.dtype):
            value = loss(run)
        scaler.scale(value).backward()
        _, finite = optimizer_step(opt, scaler, model.parameters(), 1.0)
        update_ema(ema, model, 1000, 0.999, finite)
        opt.zero_grad(set_to_none=True)
    return step

def bench_train_tokenizer(args):
    tok = TATiTok(tatitok_config(args.tokenizer))
    cfg = tok.config
    img = torch.rand(args.batch_size, 3, cfg.image_size, cfg.image_size)
    guidance = torch.randn(args.batch_size, cfg.text_context_length, cfg.text_embed_dim)

    def loss(model):
        recon, aux = model(img, guidance)
        reg = aux['quantizer_loss'] if cfg.quantize == 'vq' else 1e-6 * aux['kl_loss']
        return F.mse_loss(recon.float(), img) + reg
    opt = tok.configure_optimizers(1e-4, 1e-4, (0.9, 0.999), args.device.type)
    step = train_step(tok, opt, loss, args)
    return step, 3 * tok.estimate_flops(), dict(params=tok.get_num_params()), None

def bench_train_maskgen(args):
    tcfg = tatitok_config(args.tokenizer)
    gen = MaskGen.from_config(maskgen_config(args.generator, num_tokens=tcfg.num_latent_tokens))
    cfg = gen.config
    B, L, T = args.batch_size, tcfg.text_context_length, cfg.text_embed_dim
    if cfg.quantize == 'vq':
        x = torch.randint(0, cfg.codebook_size, (B, cfg.num_tokens))
    else:
        x = torch.randn(B, cfg.num_tokens, cfg.token_size)
    text = torch.randn(B, L, T), torch.randn(B, T), 5 + torch.rand(B)  # tokens, pooled, aesthetics
    null = torch.randn(1, L, T), torch.randn(1, T)
    draws = gen.draw_batch(args.seed, range(B))  # caption dropout, masks, noise: as the trainer's
    opt = gen.configure_optimizers(0.03, 1e-4, (0.9, 0.96))
    step = train_step(gen, opt, lambda model: model(x, *text, *null, draws=draws)[0], args)
    return step, gen.estimate_flops(L)['train'], dict(params=gen.get_num_params()), None

def bench_sample(args):
    tcfg = tatitok_config(args.tokenizer)
    tok = TATiTok(tcfg).eval()
    gen = MaskGen.from_config(maskgen_config(args.generator, num_tokens=tcfg.num_latent_tokens))
    gen.eval()
    if args.size in ('tiny', 'shapes'):  # the small tokenizer's own text tower
        te = TextEncoder.tiny(context_length=tcfg.text_context_length)
    else:
        te = TextEncoder.from_text_cfg(CLIP_L14_TEXT, 768)
    given = dict(num_steps=args.sample_steps, guidance_scale=args.guidance_scale)
    given = {k: v for k, v in given.items() if v is not None}
    sampling = Sampling.release(gen.config.quantize, **given)
    steps, guidance = sampling.num_steps, sampling.guidance_scale
    work = [(gen, 'backbone', 'mmdit'), (tok.decoder, 'forward', 'decode')]  # every step's work
    if gen.config.quantize == 'kl':
        sampling.diffusion_steps = args.diffusion_steps
        work.append((gen.diffloss.net, 'forward', 'diffusion_mlp'))
    if args.compile == 'on':
        for obj, method, _ in work:
            setattr(obj, method, torch.compile(getattr(obj, method), mode=args.compile_mode))
    captions = [f"a photo of a red fox number {i}, studio light" for i in range(args.batch_size)]

    @torch.no_grad()
    def step():
        with autocast(args.device, args.dtype):
            text, null = te(captions), te([''])  # the decoder's guidance comes from the same pass
            tokens = gen.generate(prompt_inputs(text, null), sampling, seed=args.seed)
            images = tok.decode_tokens(tokens, text['guidance'])
            return (images.clamp(0, 1) * 255).to(torch.uint8)

    def breakdown():
        parts = [(te, 'forward', 'clip'), (gen, 'generate', 'generator')] + work
        ms = time_parts(step, parts, args.device)
        ms['sampling_other'] = ms['generator'] - ms['mmdit'] - ms.get('diffusion_mlp', 0.0)
        return {k: round(v, 2) for k, v in ms.items()}

    flops = sample_flops(gen, tok, te, args.batch_size, steps, args.diffusion_steps, guidance != 1)
    info = dict(steps=steps, guidance=guidance, params=gen.get_num_params(),
                tokenizer_params=tok.get_num_params())
    return step, flops, info, breakdown

# -----------------------------------------------------------------------------
# the memory plan of every official recipe

def plan_table(processes):
    # the trainers' memory plan (runtime.choose_plan) of every official recipe on 40 and 80 GiB
    import train_tokenizer
    import train_maskgen
    rows = []
    for tokens in ('vq32', 'vq64', 'vq128', 'kl32', 'kl64', 'kl128'):
        args = train_tokenizer.get_args(['--tokens', tokens, '--data', 'shards'])
        for gib in (40, 80):
            c = train_tokenizer.plan_run(args, tatitok_config(tokens), CLIP_L14_PARAMS, processes,
                                         gib * GiB)
            rows.append(dict(c, recipe=f"train_tokenizer.py --tokens {tokens}", gib=gib))
    for size, tokens in (('l', 'vq128'), ('xl', 'vq128'), ('l', 'kl32'), ('xl', 'kl32')):
        args = train_maskgen.get_args(['--size', size, '--tokens', tokens])
        cfg = train_maskgen.generator_config(size, tatitok_config(tokens), 768)
        frozen = 4 * CLIP_L14_PARAMS  # CLIP's text tower, fp32; the tokenizer stays on the CPU
        for gib in (40, 80):
            c = train_maskgen.plan_run(args, cfg, 77, frozen, processes, gib * GiB)
            rows.append(dict(c, recipe=f"train_maskgen.py --size {size} --tokens {tokens}", gib=gib))
    print(f"| recipe, {processes} processes | GPU | micro batch x processes x accumulation | levers "
          "| planned GiB per GPU | total |\n|---|---|---|---|---|---|")
    for r in rows:
        plan = r.pop('plan')
        r['total_gib'] = round(sum(plan.values()) / GiB, 2)
        parts = ', '.join(f"{k} {v / GiB:.1f}" for k, v in plan.items())
        print(f"| `{r['recipe']}` | {r['gib']} GiB | {r['micro_batch']} x {processes} x "
              f"{r['grad_accum']} | {describe((r['checkpointing'], r['zero']))} | {parts} | "
              f"{r['total_gib']} |")
    print(json.dumps(rows))

# -----------------------------------------------------------------------------
# the command line

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--what', default='sample', choices=['train-tokenizer', 'train-maskgen',
                   'sample', 'plan'], help="a training step, sampling (default), or the memory plan")
    p.add_argument('--processes', type=number(int, 1), default=8,
                   help="plan: processes per run (default 8)")
    p.add_argument('--size', default='l', choices=['l', 'xl', 'tiny', 'shapes'],
                   help="MaskGen-L (default) / XL, tiny (tests) or shapes (the CPU quickstart)")
    p.add_argument('--tokens', default='vq128', choices=TOKENS, help="the tokenizer release; "
                   "vq / kl: the paper's vq128 (default) / kl32, the only choice for tiny / shapes")
    p.add_argument('--batch_size', type=number(int, 1), default=64,
                   help="images per step (default 64)")
    p.add_argument('--sample_steps', type=number(int, 1),
                   help="sampling: decoding steps (default 16 VQ, 32 KL)")
    p.add_argument('--diffusion_steps', type=number(int, 1), default=100,
                   help="sampling, KL: denoising steps per token (default 100)")
    p.add_argument('--guidance_scale', type=number(float, 0),
                   help="sampling (default 12 VQ, 3 KL); 1: the conditional model alone")
    p.add_argument('--dtype', default='auto', choices=['auto', 'bfloat16', 'float16', 'float32'],
                   help="autocast dtype (auto: bfloat16 on a GPU, else float32)")
    p.add_argument('--compile', default='off', choices=['on', 'off'],
                   help="torch.compile the step, or sampling's networks (default off)")
    p.add_argument('--compile_mode', default='default',
                   choices=['default', 'reduce-overhead', 'max-autotune'],
                   help="reduce-overhead: CUDA graphs")
    p.add_argument('--device', default='auto', help="auto (a GPU if any), cpu, cuda, cuda:1")
    p.add_argument('--warmup', type=number(int, 0), default=2,
                   help="untimed steps first: compilation, allocator, caches (default 2)")
    p.add_argument('--iters', type=number(int, 1), default=5,
                   help="timed steps, the median reported (default 5)")
    p.add_argument('--threads', type=number(int, 0), default=0,
                   help="CPU threads (0: torch's default)")
    p.add_argument('--seed', type=number(int, 0), default=0,
                   help="of the weights, the inputs and sampling (default 0)")
    args = p.parse_args(argv)
    q = args.tokens[:2]
    args.generator = f"{q}-{args.size}"
    args.tokenizer = dict(vq='vq128', kl='kl32').get(args.tokens, args.tokens)
    if args.size in ('tiny', 'shapes'):  # a small generator, its own tokenizer
        if args.tokens != q:
            p.error(f"--size {args.size} takes --tokens vq or kl, not {args.tokens}")
        args.generator = args.tokenizer = f"{args.size}-{q}"
    try:
        args.device = pick_device(args.device)
        args.dtype = pick_dtype(args.dtype, args.device)
    except ValueError as e:
        p.error(str(e))
    return args

def main(args, state):
    if args.what == 'plan':
        return plan_table(args.processes)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    bench = {'train-tokenizer': bench_train_tokenizer, 'train-maskgen': bench_train_maskgen,
             'sample': bench_sample}[args.what]
    try:
        with torch.device(device):  # a 600M model's init made there, not copied
            step, flops, info, breakdown = bench(args)
        for _ in range(args.warmup):
            step()
        sync(device)
        times, host = [], []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            step()
            host.append(time.perf_counter() - t0)  # the host's part: the GPU may still work
            sync(device)
            times.append(time.perf_counter() - t0)
        if breakdown is not None:
            info['breakdown_ms'] = breakdown()
        syncs, busy = count_syncs(step, device)
    except torch.cuda.OutOfMemoryError:
        raise torch.cuda.OutOfMemoryError(f"out of GPU memory at --batch_size {args.batch_size}; "
                                          "try a smaller batch") from None

    dt = sorted(times)[len(times) // 2]  # the median step, in seconds
    name = f"cpu ({torch.get_num_threads()} threads)"
    mem, mem_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 'process max RSS'
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        mem, mem_kind = torch.cuda.max_memory_allocated(device) / 1e9, 'cuda max allocated'
    wait = None
    if busy is not None:  # CUDA: the share of the step the GPU has no kernel to run
        wait = round(max(0.0, 1 - busy / (1000 * dt)), 3)
    peak = peak_flops(device)
    result = dict(vars(args), **info, device=name, dtype=str(args.dtype).removeprefix('torch.'),
                  images_per_s=round(args.batch_size / dt, 3), ms_per_step=round(1000 * dt, 2),
                  ms_per_step_min=round(1000 * min(times), 2),
                  host_ms_per_step=round(1000 * sorted(host)[len(host) // 2], 2),
                  syncs_per_step=syncs, device_wait=wait, peak_mem_gb=round(mem, 3),
                  peak_mem_kind=mem_kind, flops_per_image=int(flops),
                  peak_flops=None if peak == float('inf') else peak,
                  mfu=round(flops * args.batch_size / dt / peak, 4),  # 0 without a known peak
                  torch=torch.__version__, date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))
    print(f"{args.what} | {args.generator} {args.tokenizer} | batch {args.batch_size} | "
          f"{result['dtype']} | compile {args.compile} | {name}")
    for k in ('images_per_s', 'ms_per_step', 'host_ms_per_step', 'syncs_per_step', 'device_wait',
              'peak_mem_gb', 'flops_per_image', 'mfu', 'breakdown_ms'):
        print(f"{k:<18}{result.get(k, '')}")
    print(json.dumps(result))
    return result

if __name__ == '__main__':
    run_main(main, get_args(), USER_ERRORS)
