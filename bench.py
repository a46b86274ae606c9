"""
Benchmark training and sampling throughput of TA-TiTok and MaskGen, the nanoGPT bench.py way: random weights built
from a preset (nothing downloaded), synthetic inputs, a few warm-up steps, then timed steps with the device
synchronised, a small table, and one JSON line last (images/s, ms per step, peak memory, FLOPs per image, MFU).

$ python bench.py --what sample --size l --tokens vq128 --batch 64            # MaskGen-L VQ, 16 steps (paper: A100)
$ python bench.py --what sample --size l --tokens kl32 --batch 64             # MaskGen-L KL, 32 steps
$ python bench.py --what train-maskgen --size l --tokens vq128 --batch 64 --compile
$ python bench.py --what train-tokenizer --tokens vq128 --batch 32
$ python bench.py --what sample --size tiny --tokens vq --batch 2 --steps 2  # seconds on a CPU

Sampling is the whole text-to-image path: CLIP on the prompts (once, and once on ""), the generator's decoding
steps, the tokenizer's decoder; one extra, instrumented run splits its time into those parts, the MM-DiT passes
and the KL diffusion MLP apart. FLOPs are counted from the architecture (multiply-adds of every matmul, 2 FLOPs
each, backward = 2x forward); MFU is against the bf16 dense peak of the GPU (unknown GPU or CPU: 0).
The tokenizer's training step is the tokenizer alone with an L2 loss (no perceptual nets, no discriminator), and
the generator's uses precomputed CLIP features, so both count only what they run.
"""
import argparse
import json
import math
import resource
import sys
import time
import warnings
from contextlib import nullcontext, contextmanager, ExitStack

import torch
from torch.nn import functional as F

from tatitok import TATiTok, TextEncoder, tatitok_config, CheckpointError
from maskgen import MaskGen, GaussianDiffusion, maskgen_config, mask_schedule

# bf16 dense tensor-core peaks (the nanochat table); matched in this order against torch.cuda.get_device_name()
PEAK_FLOPS = [('H100 PCIe', 756e12), ('A100', 312e12), ('H100', 989e12), ('H200', 989e12)]
CLIP_L14_TEXT = dict(context_length=77, vocab_size=49408, width=768, heads=12, layers=12)  # ViT-L-14-336's tower
TOKENS = ['vq32', 'vq64', 'vq128', 'kl32', 'kl64', 'kl128', 'vq', 'kl']
DTYPES = dict(bfloat16=torch.bfloat16, bf16=torch.bfloat16, float16=torch.float16, fp16=torch.float16,
              float32=torch.float32, fp32=torch.float32)

def peak_flops(device_name):
    return next((v for k, v in PEAK_FLOPS if k in device_name), float('inf'))  # inf: MFU shows 0, not a guess

# -----------------------------------------------------------------------------
# FLOPs from the architecture: multiply-adds (MACs) per image; FLOPs = 2 x MACs forward, 6 x MACs for training

def vit_macs(width, layers, seq):
    # a pre-LN block per token: q, k, v, out (4 W^2) + MLP (8 W^2); attention: scores and weighted sum, 2 S^2 W
    return layers * (12 * width * width * seq + 2 * seq * seq * width)

def clip_macs(te):
    # open_clip's text tower runs all 77 positions (causal mask, but full-size matmuls), then one EOT projection
    return vit_macs(te.width, len(te.clip.transformer.resblocks), te.context_length) + te.width * te.embed_dim

def tokenizer_macs(cfg, encode=True, decode=True):
    P, N, p, macs = (cfg.image_size // cfg.patch_size) ** 2, cfg.num_latent_tokens, cfg.patch_size, 0
    if encode:  # patch embedding, ViT over [cls, patches, latents], 1x1 conv_out on the latents
        c_out = cfg.token_size * (2 if cfg.quantize == 'kl' else 1)
        macs += P * 3 * p * p * cfg.enc_width + vit_macs(cfg.enc_width, cfg.enc_layers, 1 + P + N)
        macs += N * cfg.enc_width * c_out
        macs += N * cfg.codebook_size * cfg.token_size if cfg.quantize == 'vq' else 0  # nearest-code distances
    if decode:  # token and text projections, ViT over [cls, queries, latents, text], 1x1 conv to pixels, 3x3 conv
        W, T = cfg.dec_width, cfg.text_context_length
        macs += N * cfg.token_size * W + T * cfg.text_embed_dim * W + vit_macs(W, cfg.dec_layers, 1 + P + N + T)
        macs += P * W * 3 * p * p + cfg.image_size ** 2 * 3 * 3 * 9
    return macs

def mmdit_macs(cfg, T=77):
    """One MM-DiT pass for one image: N image tokens and T text tokens, each stream with its own weights."""
    D, n, N = cfg.width, cfg.depth, cfg.num_tokens
    macs = n * 12 * D * D * N + ((n - 1) * 12 + 3) * D * D * T  # the last block's text stream has q, k, v only
    macs += n * 2 * (N + T) ** 2 * D  # joint attention
    macs += ((n - 1) * 12 + 8 + 2) * D * D  # adaLN modulations and the final norm, once per image
    return macs + (cfg.codebook_size * D * N if cfg.quantize == 'vq' else cfg.token_size * D * N)  # LM head / z_proj

def cond_macs(cfg, T=77):
    return cfg.text_embed_dim * cfg.width * T + (cfg.text_embed_dim + cfg.aes_embed_dim) * cfg.width

def diffloss_macs(cfg):
    """The KL denoiser MLP, per token: timestep and condition embeddings, input projection, res blocks, final layer."""
    W, C = cfg.diffloss_width, cfg.token_size
    return 256 * W + W * W + cfg.width * W + C * W + cfg.diffloss_depth * 5 * W * W + 2 * W * W + 2 * C * W

def train_maskgen_flops(cfg, T=77):
    extra = cfg.num_tokens * cfg.diffusion_batch_mul * diffloss_macs(cfg) if cfg.quantize == 'kl' else 0
    return 6 * (mmdit_macs(cfg, T) + cond_macs(cfg, T) + extra)

def sample_flops(gcfg, tcfg, te, batch, steps, diffusion_steps, guided):
    """Per image: CLIP on the prompt (and on "" once per batch), the generator's passes, the decoder."""
    reps, N = (2 if guided else 1), gcfg.num_tokens
    schedule = mask_schedule(N, steps, 'arccos' if gcfg.quantize == 'vq' else 'cosine')
    passes = steps if gcfg.quantize == 'vq' else sum(a > b for a, b in zip([N] + schedule, schedule))  # KL: k > 0
    T = te.context_length
    macs = clip_macs(te) * (batch + 1) / batch + reps * (cond_macs(gcfg, T) + passes * mmdit_macs(gcfg, T))
    if gcfg.quantize == 'kl':  # every token is denoised once, over all diffusion steps, both halves in one batch
        macs += reps * N * len(GaussianDiffusion(1000, diffusion_steps).timestep_map) * diffloss_macs(gcfg)
    return 2 * (macs + tokenizer_macs(tcfg, encode=False))

# -----------------------------------------------------------------------------
# timing: CUDA events on GPU (no host-device sync inside what they time), the clock on CPU

class Timer:
    """Sums the time of named spans; `with timer('clip'):` or timer.wrap('mmdit', fn). Read with ms() after a sync."""

    def __init__(self, device):
        self.cuda, self.spans = device.type == 'cuda', {}

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextmanager
    def __call__(self, name):
        start = self.now()
        yield
        self.spans.setdefault(name, []).append((start, self.now()))

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)
        return timed

    def ms(self):
        elapsed = (lambda a, b: a.elapsed_time(b)) if self.cuda else (lambda a, b: 1000 * (b - a))
        out = {name: sum(elapsed(a, b) for a, b in spans) for name, spans in self.spans.items()}
        self.spans = {}
        return out

@contextmanager
def patched(obj, attr, value):
    # an instance attribute shadowing a method for the duration (timing wrappers, compiled functions)
    old = obj.__dict__.get(attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        delattr(obj, attr) if old is None else setattr(obj, attr, old)

def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)

# -----------------------------------------------------------------------------
# the three benchmarks: each returns (step function, FLOPs per image, extras for the report)

def presets(args):
    q = args.tokens[:2]
    if args.size in ('tiny', 'shapes'):
        return f"{args.size}-{q}", f"{args.size}-{q}"
    tok = args.tokens if args.tokens not in ('vq', 'kl') else {'vq': 'vq128', 'kl': 'kl32'}[q]  # the paper's pairs
    return f"{q}-{args.size}", tok

def build_text_encoder(args):
    if args.size in ('tiny', 'shapes'):  # as long as the small tokenizer's decoder reads (shapes: 16 positions)
        return TextEncoder.tiny(context_length=tatitok_config(presets(args)[1]).text_context_length)
    return TextEncoder.from_text_cfg(CLIP_L14_TEXT, 768)  # random weights, ViT-L-14-336's text sizes

def bench_train_tokenizer(args, device, ctx):
    tcfg = tatitok_config(presets(args)[1])
    tok = TATiTok(tcfg).to(device).train()
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-4, fused=device.type == 'cuda')
    model = torch.compile(tok, mode=args.compile_mode) if args.compile_on else tok
    g = torch.Generator(device).manual_seed(args.seed)
    img = torch.rand(args.batch, 3, tcfg.image_size, tcfg.image_size, generator=g, device=device)
    guidance = torch.randn(args.batch, tcfg.text_context_length, tcfg.text_embed_dim, generator=g, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.ptdtype == torch.float16)

    def step():
        with ctx:
            recon, aux = model(img, guidance)
            reg = aux['quantizer_loss'] if tcfg.quantize == 'vq' else 1e-6 * aux['kl_loss']
            loss = F.mse_loss(recon.float(), img) + reg
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step, 6 * tokenizer_macs(tcfg), dict(tokenizer=presets(args)[1], params=tok.get_num_params())

def bench_train_maskgen(args, device, ctx):
    tcfg = tatitok_config(presets(args)[1])
    gcfg = maskgen_config(presets(args)[0], num_tokens=tcfg.num_latent_tokens)
    gen = MaskGen.from_config(gcfg).to(device).train()
    opt = gen.configure_optimizers(0.03, 1e-4, (0.9, 0.96), device.type)
    model = torch.compile(gen, mode=args.compile_mode) if args.compile_on else gen
    g, B, T = torch.Generator(device).manual_seed(args.seed), args.batch, gcfg.text_embed_dim
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device)
    x = torch.randint(0, gcfg.codebook_size, (B, gcfg.num_tokens), generator=g, device=device) \
        if gcfg.quantize == 'vq' else randn(B, gcfg.num_tokens, gcfg.token_size)
    L = tcfg.text_context_length  # text positions: 77 for CLIP, 16 for the shapes presets
    text_tokens, text_pooled, aes = randn(B, L, T), randn(B, T), 5 + torch.rand(B, generator=g, device=device)
    null_text = (randn(1, L, T), randn(1, T))  # caption dropout on, as in training
    scaler = torch.amp.GradScaler(device.type, enabled=args.ptdtype == torch.float16)

    def step():
        with ctx:
            loss, _ = model(x, text_tokens, text_pooled, aes, null_text=null_text, generator=g)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step, train_maskgen_flops(gcfg, L), dict(generator=presets(args)[0], tokenizer=presets(args)[1],
                                                 params=gen.get_num_params())

def bench_sample(args, device, ctx):
    gname, tname = presets(args)
    tcfg = tatitok_config(tname)
    gcfg = maskgen_config(gname, num_tokens=tcfg.num_latent_tokens)
    te, tok, gen = build_text_encoder(args), TATiTok(tcfg).eval(), MaskGen.from_config(gcfg).eval()
    vq = gcfg.quantize == 'vq'
    steps = args.steps or (16 if vq else 32)
    guidance = args.guidance if args.guidance is not None else (12.0 if vq else 3.0)
    if args.compile_on:  # the per-step work: generator pass, denoiser MLP, decoder (CUDA graphs: reduce-overhead)
        compile_ = lambda fn: torch.compile(fn, mode=args.compile_mode)
        for obj, attr in ((gen, '_logits' if vq else '_cond'), (tok.decoder, 'forward')) + \
                (() if vq else ((gen.diffloss.net, 'forward'),)):
            setattr(obj, attr, compile_(getattr(obj, attr)))
    captions = [f"a photo of a red fox number {i}, studio light" for i in range(args.batch)]
    kwargs = dict(aes=6.5, num_steps=steps, guidance_scale=guidance, seed=args.seed)
    kwargs.update(dict(temperature=2.0) if vq else dict(temperature=1.0, diffusion_steps=args.diffusion_steps))

    @torch.no_grad()
    def step(timer=None):
        timer = timer or (lambda name: nullcontext())
        with ctx:
            with timer('clip'):  # once per prompt and once for "": the decoder's guidance comes from the same pass
                text, null = te(captions), te([''])
            with timer('generator'):
                tokens = gen.generate(text['tokens'], text['pooled'], null['tokens'], null['pooled'], **kwargs)
            with timer('decode'):
                images = (tok.decode_tokens(tokens, text['guidance']).clamp(0, 1) * 255).to(torch.uint8)
        return images

    def breakdown():
        """One instrumented run: ms per part, and on CUDA how many host-device syncs generate() made."""
        timer, parts = Timer(device), [(gen, '_logits' if vq else '_cond', 'mmdit')]
        parts += [] if vq else [(gen.diffloss.net, 'forward', 'diffusion_mlp')]
        with ExitStack() as stack:
            for obj, attr, name in parts:
                stack.enter_context(patched(obj, attr, timer.wrap(name, getattr(obj, attr))))
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter('always')
            if device.type == 'cuda':
                stack.enter_context(patched(gen, 'generate', _sync_counting(gen.generate)))
            step(timer)
        sync(device)
        ms = timer.ms()
        ms['sampling_other'] = ms['generator'] - sum(ms.get(k, 0.0) for k in ('mmdit', 'diffusion_mlp'))
        nsync = sum('synchroniz' in str(w.message) for w in caught) if device.type == 'cuda' else None
        return {k: round(v, 2) for k, v in ms.items()}, nsync

    flops = sample_flops(gcfg, tcfg, te, args.batch, steps, args.diffusion_steps, guidance != 1.0)
    return step, flops, dict(generator=gname, tokenizer=tname, steps=steps, guidance=guidance,
                             diffusion_steps=None if vq else args.diffusion_steps, params=gen.get_num_params(),
                             tokenizer_params=tok.get_num_params(), breakdown=breakdown)

def _sync_counting(fn):
    def counted(*args, **kwargs):
        torch.cuda.set_sync_debug_mode('warn')  # each synchronising op inside generate() warns
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode('default')
    return counted

# -----------------------------------------------------------------------------

def make_parser():
    p = argparse.ArgumentParser(description="Training and sampling throughput and MFU of TA-TiTok / MaskGen, random "
                                "weights, synthetic inputs.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--what', default='sample', choices=['train-tokenizer', 'train-maskgen', 'sample'],
                   help="what to time: a tokenizer training step, a generator training step, or text-to-image sampling")
    p.add_argument('--size', default='l', choices=['l', 'xl', 'tiny', 'shapes'],
                   help="generator size (MaskGen-L / XL), or a small preset for tests (tiny) and the CPU quickstart "
                   "(shapes), which picks the small tokenizer and text tower of that name too")
    p.add_argument('--tokens', default='vq128', choices=TOKENS, help="the tokenizer (an official release's "
                   "architecture); the generator models its tokens. vq / kl: the paper's pairing (vq128 / kl32), "
                   "and the only choice for --size tiny / shapes")
    p.add_argument('--batch', type=int, default=64, help="images per step")
    p.add_argument('--steps', type=int, default=None, help="sampling: decoding steps (default 16 VQ, 32 KL, as in "
                   "the paper's speed table)")
    p.add_argument('--diffusion_steps', type=int, default=100,
                   help="sampling, KL: denoising steps of the diffusion MLP")
    p.add_argument('--guidance', type=float, default=None, help="sampling: guidance scale (default 12 VQ, 3 KL); 1 "
                   "runs the conditional model alone, half the batch")
    p.add_argument('--dtype', default='auto', choices=['auto'] + list(DTYPES), help="autocast dtype (auto: bfloat16 "
                   "on a GPU that supports it, else float32)")
    p.add_argument('--compile', nargs='?', const='on', default='off', choices=['on', 'off'],
                   help="torch.compile the step (sampling: the generator pass, the diffusion MLP and the decoder)")
    p.add_argument('--compile_mode', default='default', choices=['default', 'reduce-overhead', 'max-autotune'],
                   help="torch.compile mode; reduce-overhead uses CUDA graphs")
    p.add_argument('--device', default='auto', help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument('--warmup', type=int, default=2, help="untimed steps first (compilation, allocator, caches)")
    p.add_argument('--iters', type=int, default=5, help="timed steps; the median is reported")
    p.add_argument('--threads', type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument('--seed', type=int, default=0, help="seed of the random weights, the inputs and sampling")
    return p

def get_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    for k in ('batch', 'iters', 'diffusion_steps') + (('steps',) if args.steps is not None else ()):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be at least 1")
    if args.warmup < 0 or args.threads < 0:
        p.error("--warmup and --threads must not be negative")
    if args.size in ('tiny', 'shapes') and args.tokens not in ('vq', 'kl'):
        p.error(f"--size {args.size} takes --tokens vq or kl (its own small tokenizer), not {args.tokens}")
    try:
        auto = 'cuda' if torch.cuda.is_available() else 'cpu'
        args.device = torch.device(auto if args.device == 'auto' else args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)")
    if args.device.type == 'cuda' and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA GPU here (use --device cpu)")
    if args.dtype == 'auto':
        args.dtype = 'bfloat16' if args.device.type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
    args.ptdtype = DTYPES[args.dtype]
    if args.ptdtype == torch.float16 and args.device.type != 'cuda':
        p.error("--dtype float16 autocast needs a CUDA GPU; use bfloat16 or float32")
    args.compile_on = args.compile == 'on'
    return args

def main(argv=None):
    args = get_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    ctx = nullcontext() if args.ptdtype == torch.float32 else torch.autocast(device.type, dtype=args.ptdtype)
    build = dict(zip(['train-tokenizer', 'train-maskgen', 'sample'],
                     [bench_train_tokenizer, bench_train_maskgen, bench_sample]))[args.what]
    try:
        with torch.device(device):  # built in place: a 600M model's init on the GPU, not on the CPU then copied
            step, flops, info = build(args, device, ctx)
        for _ in range(args.warmup):
            step()
        sync(device)
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
        breakdown, nsync = info.pop('breakdown')() if 'breakdown' in info else (None, None)
    except torch.cuda.OutOfMemoryError:
        print(f"error: out of GPU memory at --batch {args.batch}; try a smaller batch", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    dt = sorted(times)[len(times) // 2]  # median seconds per step
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f"cpu ({torch.get_num_threads()} threads)"
    peak = peak_flops(name) if device.type == 'cuda' else float('inf')
    if device.type == 'cuda':
        mem, mem_kind = torch.cuda.max_memory_allocated(device) / 1e9, 'cuda max allocated'
    else:
        mem, mem_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 'process max RSS'
    images_per_s = args.batch / dt
    result = dict(what=args.what, size=args.size, tokens=args.tokens, **info,
                  batch=args.batch, dtype=args.dtype, compile=args.compile_on, compile_mode=args.compile_mode,
                  device=name, images_per_s=round(images_per_s, 3), ms_per_step=round(1000 * dt, 2),
                  ms_per_step_min=round(1000 * min(times), 2), iters=args.iters,
                  peak_mem_gb=round(mem, 3), peak_mem_kind=mem_kind, flops_per_image=int(flops),
                  achieved_tflops=round(flops * images_per_s / 1e12, 3),
                  peak_flops=None if math.isinf(peak) else peak, mfu=round(flops * images_per_s / peak, 4),
                  torch=torch.__version__, date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))
    if breakdown is not None:
        result['ms_per_decoding_step'] = round(1000 * dt / result['steps'], 2)
        result['breakdown_ms'] = breakdown
        result['syncs_in_decoding_loop'] = nsync  # CUDA only: counted with torch.cuda.set_sync_debug_mode
    rows = [('images/s', f"{images_per_s:.3f}"), ('ms/step (median)', f"{1000 * dt:.1f}"),
            ('peak memory', f"{mem:.2f} GB ({mem_kind})"), ('FLOPs/image', f"{flops / 1e9:.1f} G"),
            ('MFU', f"{100 * result['mfu']:.1f}%" if result['peak_flops'] else 'n/a (no peak for this device)')]
    rows += [(f"  {k} ms", f"{v:.1f}") for k, v in (breakdown or {}).items()]
    print(f"{args.what} | {info.get('generator', '')} {info.get('tokenizer', '')} | batch {args.batch} | "
          f"{args.dtype} | compile {args.compile} | {name}")
    for k, v in rows:
        print(f"{k:<22}{v}")
    print(json.dumps(result))
    return result

if __name__ == '__main__':
    main()
