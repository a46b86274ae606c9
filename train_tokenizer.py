"""
Train TA-TiTok with the official one-stage recipe: L2 + perceptual (LPIPS + 0.1 ConvNeXt-S) + VQ or KL terms, a
blur-pool PatchGAN with hinge loss and LeCAM, AdamW, cosine schedule, EMA. From one CPU to many GPUs.

CPU quickstart (32 px shapes, tiny random text tower, no downloads):
$ python train_tokenizer.py --preset shapes                 # VQ tokens, out/shapes-tokenizer
$ python train_tokenizer.py --preset shapes --tokens kl     # continuous tokens, out/shapes-tokenizer-kl
One GPU, or one node of 8 GPUs (the global batch stays fixed, so both train the same model):
$ python train_tokenizer.py --tokens vq128 --data 'shards/{00000..09999}.tar' --eval_data 'val/{0000..0009}.tar'
$ torchrun --standalone --nproc_per_node=8 train_tokenizer.py --tokens vq128 --data ... --eval_data ...
Several nodes (run on each, with its --node_rank):
$ torchrun --nnodes=4 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
    train_tokenizer.py --tokens vq128 --data ... --eval_data ...
A run that was killed continues with the same command plus --resume.

Outputs in --out_dir: ckpt.pt (weights, EMA, optimizers, data position, the config), metrics.jsonl (one row per
log line) and recon_STEP.png (held-out images above their reconstructions). The log goes to stdout.

References:
1) the paper: https://arxiv.org/abs/2501.07730
2) the official code: https://github.com/bytedance/1d-tokenizer (scripts/train_tatitok.py,
   modeling/modules/{losses,perceptual_loss,lpips,discriminator,ema_model}.py, utils/train_utils.py)
3) LPIPS: https://arxiv.org/abs/1801.03924, weights as in https://github.com/CompVis/taming-transformers
4) LeCAM: https://arxiv.org/abs/2104.03310
5) nanoGPT's train.py and DiT's train.py, whose shape this file follows
"""
import argparse
import copy
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from tatitok import (TATiTok, TATiTokConfig, TextEncoder, UserError, tatitok_config,
                     load_official, param_groups, reachable, at_least_fp32, clip_ids)
from runtime import (init_distributed, pick_device, pick_dtype, autocast, peak_flops, get_lr,
                     save_checkpoint, all_gather_objects, open_checkpoint, make_out_dir, number,
                     add_system_flags)
from data import make_loader, make_grid, expand_source, UserError, merge_states, save_png
from runtime import (micro_batches, on_rank0, broadcast_state, optimizer_step, update_ema, shard_optimizer,
                     optimizer_state, choose_plan, plan_lines, to_device, stop_if_nonfinite, run_main,
                     interrupted_at)

# -----------------------------------------------------------------------------
# perceptual loss: LPIPS (VGG16) + 0.1 x MSE of ConvNeXt-S logits, the release's "lpips-convnext_s-1.0-0.1".
# Hand-written nets whose parameter names match torchvision's files, so the standard ImageNet weights load with a
# strict key check and torchvision is never imported (a test builds torchvision's models to check the layouts).

WEIGHTS = {  # file name -> (url, md5); torchvision files carry a sha256 prefix in the name instead
    'vgg16-397923af.pth': ('https://download.pytorch.org/models/vgg16-397923af.pth', None),
    'convnext_small-0c510722.pth': ('https://download.pytorch.org/models/convnext_small-0c510722.pth', None),
    'vgg_lpips.pth': ('https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1',
                      'd507d7349b931f0638a25a48a722f98a'),
}

def hub_weights(name):
    """A state dict from torch.hub's cache (~/.cache/torch/hub/checkpoints), downloaded on first use."""
    url, md5 = WEIGHTS[name]
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', name)
    hint = f"download {url} to {path} on a machine with internet, or train without it: --perceptual none"
    if not os.path.exists(path) and not reachable(url.split('/')[2]):
        raise UserError(f"cannot get the perceptual-loss weights {name} (offline?); {hint}")
    try:
        sd = torch.hub.load_state_dict_from_url(url, file_name=name, map_location='cpu', check_hash=md5 is None,
                                                weights_only=True, progress=False)
    except Exception as e:  # a proxy, a truncated file: all the same to the user
        raise UserError(f"cannot get the perceptual-loss weights {name} ({type(e).__name__}); {hint}") from None
    if md5 and hashlib.md5(open(path, 'rb').read()).hexdigest() != md5:
        raise UserError(f"{path}: md5 mismatch, delete it and retry")
    return sd

class LayerNorm2d(nn.LayerNorm):

    def forward(self, x):  # (B, C, H, W), normalised over C
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

class Permute(nn.Module):

    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)

class CNBlock(nn.Module):

    def __init__(self, dim):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute(0, 2, 3, 1),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), Permute(0, 3, 1, 2))
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))

    def forward(self, x):
        return x + self.layer_scale * self.block(x)  # stochastic depth is off in eval

class ConvNeXtSmall(nn.Module):
    """torchvision's convnext_small: stages of (96, 3), (192, 3), (384, 27), (768, 3) blocks."""

    def __init__(self):
        super().__init__()
        dims, depths = (96, 192, 384, 768), (3, 3, 27, 3)
        layers = [nn.Sequential(nn.Conv2d(3, 96, 4, stride=4), LayerNorm2d(96, eps=1e-6))]
        for i, (d, n) in enumerate(zip(dims, depths)):
            layers.append(nn.Sequential(*[CNBlock(d) for _ in range(n)]))
            if i < 3:
                layers.append(nn.Sequential(LayerNorm2d(d, eps=1e-6), nn.Conv2d(d, dims[i + 1], 2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(LayerNorm2d(768, eps=1e-6), nn.Flatten(1), nn.Linear(768, 1000))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3), keepdim=True))  # (B, 1000) logits

def vgg16_features():
    """torchvision's vgg16().features[:30], up to relu5_3 (the part LPIPS reads)."""
    layers, c = [], 3
    for v in (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512):
        if v == 'M':
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v
    return nn.Sequential(*layers)

class PerceptualLoss(nn.Module):
    """The parts of the release's PerceptualLoss: LPIPS per image and the MSE of ConvNeXt-S's logits
    (generator_loss weighs them)."""
    TAPS = (3, 8, 15, 22, 29)  # relu1_2 .. relu5_3

    def __init__(self, kind, pretrained=True):
        super().__init__()
        self.features = vgg16_features()  # keys 'features.N.*' as torchvision's vgg16 file
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512)])
        self.convnext = ConvNeXtSmall() if kind == 'lpips-convnext' else None
        self.register_buffer('shift', torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1))  # LPIPS scaling layer
        self.register_buffer('scale', torch.tensor([.458, .448, .450]).view(1, 3, 1, 1))
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))  # ImageNet
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        if pretrained:
            vgg = hub_weights('vgg16-397923af.pth')
            vgg = {k[len('features.'):]: v for k, v in vgg.items() if k.startswith('features.')}
            vgg = {k: v for k, v in vgg.items() if int(k.split('.')[0]) < 30}
            load_official(self.features, vgg, 'vgg16-397923af.pth')
            lin = hub_weights('vgg_lpips.pth')
            lin = {k: v for k, v in lin.items() if k.startswith('lin')}  # 'linI.model.1.weight'
            load_official(self.lins, lin, 'vgg_lpips.pth', rename=[(f'lin{i}.model.1.', f'{i}.') for i in range(5)])
            if self.convnext is not None:
                load_official(self.convnext, hub_weights('convnext_small-0c510722.pth'), 'convnext_small-0c510722.pth')
        self.requires_grad_(False).eval()

    def vgg_taps(self, x):
        """The VGG16 features LPIPS compares, at relu1_2 .. relu5_3, each of unit length over channels."""
        h = (x * 2 - 1 - self.shift) / self.scale  # LPIPS wants [-1, 1], then its scaling layer
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.TAPS:
                taps.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return taps

    def convnext_logits(self, x):
        # resized to 224 as released (perceptual_loss.py): bilinear with antialias, which matters when
        # 256 px images shrink
        x = F.interpolate(x, size=224, mode='bilinear', align_corners=False, antialias=True)
        return self.convnext((x - self.mean) / self.std)  # (B, 1000)

    def forward(self, x, y):
        """Targets x (no gradient reaches them: their features keep no graph) and reconstructions y ->
        dict(lpips=(B,), convnext_mse=() with ConvNeXt-S), the parts of the release's loss."""
        with torch.no_grad():
            fx = self.vgg_taps(x)
        lpips = 0
        for a, b, lin in zip(fx, self.vgg_taps(y), self.lins):  # the 1x1 'lin' conv, a weighted channel sum
            lpips = lpips + ((a - b) ** 2 * lin.weight.view(1, -1, 1, 1)).sum(1).mean((1, 2))  # (B,)
        parts = dict(lpips=lpips)
        if self.convnext is not None:
            with torch.no_grad():
                lx = self.convnext_logits(x)
            parts['convnext_mse'] = F.mse_loss(lx, self.convnext_logits(y))
        return parts

# -----------------------------------------------------------------------------
# the discriminator: the release's NLayerDiscriminator (MaskBit-style PatchGAN with blur downsampling)

class BlurPool(nn.Module):
    """Depthwise [1,3,3,1] x [1,3,3,1] / 64 blur with stride 2, 'same' padding as the release's BlurBlock."""

    def __init__(self):
        super().__init__()
        k = torch.tensor([1., 3., 3., 1.])
        self.register_buffer('kernel', (k[None, :] * k[:, None] / 64)[None, None])  # (1, 1, 4, 4)

    def forward(self, x):
        pad = max((math.ceil(x.shape[-1] / 2) - 1) * 2 + 4 - x.shape[-1], 0)  # TF 'same' for k=4, s=2
        x = F.pad(x, [pad // 2, pad - pad // 2] * 2)
        return F.conv2d(x, self.kernel.expand(x.shape[1], -1, -1, -1), stride=2, groups=x.shape[1])

class Discriminator(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, 1, 16, 16) logits. Keys as the release (block_in, blocks, to_logits)."""

    def __init__(self, width=128, stages=3):
        super().__init__()
        act = lambda: nn.LeakyReLU(0.1)
        self.block_in = nn.Sequential(nn.Conv2d(3, width, 5, padding=2), act())  # Conv2dSame: odd k, padding k//2
        chans = [width] + [width * 2 ** i for i in range(stages)]
        blocks = [nn.Sequential(nn.Conv2d(a, b, 3, padding=1), BlurPool(), nn.GroupNorm(32, b), act())
                  for a, b in zip(chans[:-1], chans[1:])]
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveMaxPool2d((16, 16))
        C = chans[-1]
        self.to_logits = nn.Sequential(nn.Conv2d(C, C, 1), act(), nn.Conv2d(C, 1, 5, padding=2))

    def forward(self, x):
        x = self.block_in(x)
        for block in self.blocks:
            x = block(x)
        return self.to_logits(self.pool(x))

# -----------------------------------------------------------------------------
# the losses, in fp32 as released (its loss module runs with autocast off, on float inputs)

def gan_on(step, disc_start):
    """The release's should_discriminator_be_trained: from step disc_start on, that step included;
    -1: never."""
    return 0 <= disc_start <= step

def generator_loss(img, recon, aux, args, perceptual, disc=None):
    """The tokenizer's loss (the release's ReconstructionLoss_Single_Stage, generator side)
    -> (loss, terms). recon goes into every term as the decoder gives it, unclamped, as released.
    disc: the discriminator once the GAN is on (None before); its weights are taken detached, so
    only the image gets a gradient from the adversarial term (the release turns theirs off)."""
    with torch.autocast(img.device.type, enabled=False):
        recon = at_least_fp32(recon)
        terms = dict(recon=F.mse_loss(recon, img))
        loss = terms['recon']
        if perceptual is not None:
            terms.update(perceptual(img, recon))  # lpips (B,), convnext_mse
            # the release's (1.0 lpips + 0.1 convnext) / 1.1 at weight 1.1: lpips + 0.1 convnext
            convnext = terms.get('convnext_mse', 0.0)
            terms['perceptual'] = terms['lpips'].mean() + args.convnext_weight * convnext
            loss = loss + args.perceptual_weight * terms['perceptual']
        if 'quantizer_loss' in aux:
            terms.update(quantizer=aux['quantizer_loss'], commitment=aux['commitment_loss'],
                         codebook=aux['codebook_loss'], usage=aux['usage'], perplexity=aux['perplexity'])
            loss = loss + args.quantizer_weight * terms['quantizer']
        else:
            terms['kl'] = aux['kl_loss']
            loss = loss + args.kl_weight * terms['kl']
        if disc is not None and args.disc_weight > 0:
            params = {k: v.detach() for k, v in [*disc.named_parameters(), *disc.named_buffers()]}
            logits_fake = torch.func.functional_call(disc, params, (recon,))  # (B, 1, 16, 16)
            terms['g_adv'] = -logits_fake.mean()  # hinge generator loss
            # a constant weight: the release has no adaptive (gradient-norm) weight
            loss = loss + args.disc_weight * terms['g_adv']
    terms['loss'] = loss
    return loss, terms

def discriminator_backward(disc, pairs, lecam_ema, lecam_weight, scaler, world):
    """The discriminator's loss on the global batch, and its gradients (the optimizer step is the
    caller's). pairs: [(images, detached reconstructions)], this process's micro batches;
    lecam_ema: the EMAs of the mean real and fake logits. The release's loss (losses.py):
    hinge + lecam_weight x LeCAM (https://arxiv.org/abs/2104.03310), where
    LeCAM = relu(mean real - ema fake)^2 + relu(ema real - mean fake)^2
    on the means over the whole batch -> (terms, the EMAs after the step)."""
    n = len(pairs)
    with torch.autocast(lecam_ema.device.type, enabled=False):
        # 1. the global batch's mean real and fake logits, one all-reduce
        sums = lecam_ema.new_zeros(3)  # real logits' sum, fake logits' sum, their count
        with torch.no_grad():
            for img, recon in pairs:
                real, fake = disc(torch.cat([img, at_least_fp32(recon)])).chunk(2)  # (B, 1, 16, 16)
                sums += torch.stack([real.sum(), fake.sum(), real.new_tensor(real.numel())])
        if world > 1:
            dist.all_reduce(sums)
        mean_real, mean_fake = sums[:2] / sums[2]
        ema_real, ema_fake = lecam_ema
        lecam = F.relu(mean_real - ema_fake) ** 2 + F.relu(ema_real - mean_fake) ** 2
        # d LeCAM / d logit is the same for every real logit, c_real / count (fake: c_fake / count),
        # so c x mean(logits) per micro batch, averaged as the hinge is, has LeCAM's exact gradient
        c_real = 2 * F.relu(mean_real - ema_fake)
        c_fake = -2 * F.relu(ema_real - mean_fake)
        # 2. per micro batch: the hinge loss and that stand-in for LeCAM, backward
        hinge, logits = 0.0, []
        for i, (img, recon) in enumerate(pairs):
            if world > 1:  # all-reduce the gradients on the last micro step only
                disc.require_backward_grad_sync = i == n - 1
            real, fake = disc(torch.cat([img, at_least_fp32(recon)])).chunk(2)  # (B, 1, 16, 16)
            h = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
            lecam_part = c_real * real.mean() + c_fake * fake.mean()
            scaler.scale((h + lecam_weight * lecam_part) / n).backward()
            hinge = hinge + h.detach() / n
            logits.append((real.detach(), fake.detach()))
    real, fake = (torch.cat(x) for x in zip(*logits))  # (B_process, 1, 16, 16) each
    terms = dict(d_loss=hinge + lecam_weight * lecam, d_hinge=hinge, lecam=lecam, logits_real=real,
                 logits_fake=fake)
    ema = lecam_ema * 0.999 + torch.stack([mean_real, mean_fake]) * (1 - 0.999)  # decay 0.999
    return terms, ema

# -----------------------------------------------------------------------------
# small runs and the codebook

@torch.no_grad()
def small_run_init(tok):
    """--init small, the shapes recipe's: two changes to the release's init that take a 1M-parameter tokenizer off
    the mean-image plateau within minutes (the architecture, and so the checkpoint layout, is unchanged):
    1. the encoder's Linear and Conv weights get torch's default init, as the release's decoder already does: at
       std 0.02 the image reaches the latent tokens only as a ~5% part of their residual stream;
    2. the image grids' position embeddings (encoder patches, decoder queries) start as a 2D sin-cos table (MAE's),
       so where a patch sits is readable from step 0 instead of learned from random vectors."""
    for m in tok.encoder.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.reset_parameters()
    for pe in (tok.encoder.positional_embedding, tok.decoder.positional_embedding):
        grid, W = math.isqrt(pe.shape[0] - 1), pe.shape[1]  # row 0 is the class token's, kept random
        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')  # (grid, grid) each
        freqs = 100.0 ** (-torch.arange(W // 4) / (W // 4))  # (W/4,) from 1 down to ~1/100 cycles per patch
        x = xs.flatten()[:, None] * freqs  # (P, W/4)
        y = ys.flatten()[:, None] * freqs
        pe[1:] = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).to(pe)  # (P, W)

@torch.no_grad()
@torch.no_grad()
def cluster_codebook(codebook, embed_prob, features, ids, apply, decay=0.99, l2=False):
    """The release's clustering_vq (CVQ-VAE, https://arxiv.org/abs/2307.15139), training only: each code moves toward
    its closest encoder feature in the batch, by exp(-10 K usage / (1 - decay)), so rarely used codes all the way.
    features (n, C) and ids (n,) of the whole global batch in global sample order: the update is the same function
    of the global batch for any world size. apply: a tensor, False leaves everything as it is (a skipped step), on
    the device. l2: the quantizer's use_l2_norm (closeness on the sphere)."""
    K = codebook.shape[0]
    counts = features.new_zeros(K).index_add_(0, ids, features.new_ones(len(ids)))  # no sync, unlike bincount
    prob = embed_prob * decay + counts / counts.sum() * (1 - decay)  # EMA of each code's share of the tokens
    embed_prob.copy_(torch.where(apply, prob, embed_prob))
    best_d = torch.full((K,), float('inf'), device=codebook.device)
    anchor = torch.zeros_like(codebook)
    e = F.normalize(codebook, dim=-1) if l2 else codebook
    for f in features.split(8192):  # the closest feature to each code, a chunk of features at a time
        fn = F.normalize(f, dim=-1) if l2 else f
        d = fn.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * fn @ e.t()  # (n, K)
        d_min, i = d.min(0)
        better = d_min < best_d
        best_d = torch.where(better, d_min, best_d)
        anchor = torch.where(better[:, None], f[i], anchor)  # (K, C)
    alpha = torch.exp(-embed_prob * K * 10 / (1 - decay) - 1e-3)[:, None] * apply  # (K, 1)
    codebook.mul_(1 - alpha).add_(anchor * alpha)

def cluster_global(quantizer, embed_prob, feats, world, apply):
    """cluster_codebook on the features of every rank's micro batches, feats = [(features, ids, global sample
    indices)], in global sample order: the same update for any world size."""
    parts = [torch.cat(x) for x in zip(*feats)]  # features (n, N, C), ids (n, N), indices (n,)
    if world > 1:
        for j, x in enumerate(parts):
            gathered = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(gathered, x)
            parts[j] = torch.cat(gathered)
    f, i, index = parts
    order = index.argsort()
    cluster_codebook(quantizer.embedding.weight.data, embed_prob, f[order].flatten(0, 1), i[order].flatten(),
                     apply, l2=quantizer.use_l2_norm)

def prepare_sample(sample, index, tokenizer, context_length, noise, seed):
    """A data worker's part of global sample `index`: its caption's CLIP token ids and, KL, the noise of its
    posterior sample (noise: its shape), drawn from (seed, index) so any number of processes draws the same."""
    out = dict(ids=clip_ids(tokenizer, sample['caption'], context_length))
    if noise:
        out['noise'] = np.random.default_rng([seed, index]).standard_normal(noise, dtype=np.float32)
    return out

def loss_activation_bytes(args, image_size):
    """Per sample, what the losses keep for the backward pass, in fp32 as they run (the memory plan; checked
    against autograd's saved tensors in the tests): the reconstruction, LPIPS's VGG16 on it (the target's
    features keep no graph), ConvNeXt-S on it at 224 px, the discriminator on it once the GAN is on. The
    discriminator's own step comes after the generator's backward, and needs less."""
    pixels = image_size ** 2
    saved = 12 * 3 * pixels  # the reconstruction, through the L2 loss
    if args.perceptual != 'none':
        saved += 1951 * pixels
    if args.perceptual == 'lpips-convnext':
        saved += 90.2e6  # at 224 px whatever the image size
    if args.disc_start >= 0:  # its maps shrink by 2 per stage, then pool to 16 x 16
        saved += args.disc_width * (20.9 * pixels + 22664)
    return saved

def plan_run(args, cfg, clip_params, world, memory):
    """The micro batch, levers and memory plan of a run on GPUs of `memory` bytes (None: the CPU): the
    tokenizer built on the meta device (nothing allocated) to count its parameters; the frozen CLIP text
    tower (clip_params) and perceptual nets, and the discriminator with its AdamW, beside it."""
    with torch.device('meta'):
        model = TATiTok(cfg)
        disc = Discriminator(args.disc_width)
        perceptual = nn.Module()  # none
        if args.perceptual != 'none':
            perceptual = PerceptualLoss(args.perceptual, pretrained=False)
    count = lambda m: sum(p.numel() for p in m.parameters())
    frozen = 4 * (clip_params + count(perceptual)) + 16 * count(disc)
    act = model.activation_bytes()
    losses = loss_activation_bytes(args, cfg.image_size)
    act = dict(act, saved=act['saved'] + losses, checkpointed=act['checkpointed'] + losses)
    return choose_plan(model, act, frozen, args.batch_size, args.micro_batch_size, world, memory,
                       args.checkpointing, args.zero)

def build(args, resumed):
    """-> the frozen text encoder and the tokenizer, new, or as the checkpoint being resumed has them."""
    if resumed:
        return TextEncoder.from_spec(resumed['text_encoder']), TATiTok(TATiTokConfig(**resumed['model_args']))
    text_encoder = TextEncoder.from_name(args.clip, tatitok_config(args.model).text_context_length)
    # the decoder reads the text encoder's width and length
    cfg = tatitok_config(args.model, text_embed_dim=text_encoder.width, text_context_length=text_encoder.context_length)
    model = TATiTok(cfg)
    if args.init == 'small':
        small_run_init(model)
    return text_encoder, model

@torch.no_grad()
def evaluate(ema, text_encoder, loader, args, device, ctx, step):
    """PSNR of the EMA model on held-out images (8-bit rounded, as saved), a recon grid, VQ codebook usage -> a log
    line. KL decodes the posterior mean."""
    psnr, ids, n, grid = [], [], 0, None
    for batch in loader:
        img = batch['image'][:args.eval_images - n].to(device).float() / 255
        guidance = text_encoder(batch['caption'][:len(img)])['guidance']
        with ctx:
            recon, aux = ema(img, guidance, sample=False)
        recon = (recon.float().clamp(0, 1) * 255).round() / 255
        psnr.append(-10 * torch.log10((recon - img).pow(2).mean((1, 2, 3)).clamp_min(1e-10)))  # (B,)
        if 'ids' in aux:
            ids.append(aux['ids'].flatten())
        if grid is None:
            pair = torch.cat([img[:8], recon[:8]])
            grid = make_grid((pair * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy(), ncol=len(img[:8]))
        n += len(img)
        if n >= args.eval_images:
            break
    if n == 0:
        raise UserError(f"--eval_data {args.eval_data}: no usable image in it ({loader.counts}); --eval_data none "
                        f"trains without evaluations")
    path = os.path.join(args.out_dir, f"recon_{step:07d}.png")
    save_png(grid, path)
    msg = f"eval step {step} | psnr {torch.cat(psnr).mean().item():.2f} dB on {n} held-out images | grid {path}"
    if ids:
        counts = torch.bincount(torch.cat(ids), minlength=ema.config.codebook_size).float()
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()).item()
        msg += f" | codebook usage {(counts > 0).float().mean().item():.1%} perplexity {perplexity:.1f}"
    return msg

# -----------------------------------------------------------------------------
# recipes and flags: every flag left unset takes its value from the recipe

OFFICIAL_TOKENS = ('vq32', 'vq64', 'vq128', 'kl32', 'kl64', 'kl128')
RECIPES = {
    # the release's configs/training/TA-TiTok/*.yaml; its global batch is not stated (32 per GPU x 8 assumed)
    'official': dict(batch_size=256, micro_batch_size=32, max_steps=650_000, lr=1e-4, encoder_lr_scale=1.0,
                     end_lr=1e-5, warmup_steps=10_000, weight_decay=1e-4, beta2=0.999, disc_start=200_000,
                     disc_lr=1e-4, disc_width=128, perceptual='lpips-convnext', clip='ViT-L-14-336:openai',
                     eval_data='none', eval_images=1000, log_every=100, eval_every=10_000, ckpt_every=5_000,
                     num_workers=8, init='release'),
    # the CPU quickstart: 32 px shapes, a random tiny text tower, no perceptual loss or GAN (no downloads); the
    # encoder at a third of the lr, so the high lr of the decoder and codebook does not collapse the codebook.
    # TUNING.md has the measurements behind every number
    'shapes': dict(batch_size=32, micro_batch_size=None, max_steps=2700, lr=8.5e-3, encoder_lr_scale=1 / 3,
                   end_lr=8.5e-4, warmup_steps=500, weight_decay=1e-4, beta2=0.99, disc_start=-1, disc_lr=1e-4,
                   disc_width=32, perceptual='none', clip='tiny', data='shapes', eval_data='shapes:val',
                   eval_images=256, log_every=100, eval_every=675, ckpt_every=1350, num_workers=0, init='small'),
    # the tests: 32 px, a few steps
    'tiny': dict(batch_size=8, micro_batch_size=None, max_steps=10, lr=1e-3, encoder_lr_scale=1.0, end_lr=1e-4,
                 warmup_steps=2, weight_decay=1e-4, beta2=0.999, disc_start=4, disc_lr=1e-4, disc_width=32,
                 perceptual='none', clip='tiny', data='shapes', eval_data='shapes:val', eval_images=16,
                 log_every=1, eval_every=1000, ckpt_every=5, num_workers=0, init='release'),
}
RECIPES['shapes-kl'] = dict(RECIPES['shapes'], max_steps=2400, eval_every=600, ckpt_every=1200, lr=4.2e-3,
                            end_lr=4.2e-4)
MODEL_FLAGS = ('preset', 'tokens', 'clip')  # what a resumed run must keep

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train TA-TiTok (the official one-stage recipe), on a CPU or GPUs "
                                "(torchrun). A flag without a default shown takes it from the recipe: --tokens "
                                "vq128 etc. (official) or --preset shapes|tiny; see RECIPES in this file.")
    pos, pos_int, free = number(float, 0), number(int, 1), number(float)
    g = p.add_argument_group('model')
    g.add_argument('--tokens', help="the release to train, vq32|vq64|vq128|kl32|kl64|kl128 (its architecture and "
                   "recipe); with --preset: vq or kl (default vq)")
    g.add_argument('--preset', choices=['shapes', 'tiny'], help="a small recipe instead of an official one: "
                   "shapes (the CPU quickstart, 32 px), tiny (the tests)")
    g.add_argument('--clip', help="text encoder: tiny (random, no download), MODEL:PRETRAINED of open_clip "
                   "(ViT-L-14-336:openai is the release's), or a local weights file")
    g.add_argument('--init', choices=['release', 'small'], help="weight init: the release's, or small (torch's "
                   "default encoder weights, 2D sin-cos grid positions) for tiny fast runs")
    g = p.add_argument_group('data')
    g.add_argument('--data', help="training images: tar shards ('d/{00000..00099}.tar'), a glob, a folder of "
                   "images with .txt captions, or shapes")
    g.add_argument('--eval_data', help="held-out images for PSNR and grids (same forms, or shapes:val); none: skip")
    g.add_argument('--num_workers', type=number(int, 0), help="data loader processes per GPU")
    g = p.add_argument_group('optimization')
    g.add_argument('--batch_size', type=pos_int, help="the GLOBAL batch: images per optimizer step, all processes")
    g.add_argument('--micro_batch_size', type=pos_int, help="at most this many images per process per forward "
                   "(the largest that divides batch_size / processes); the rest is gradient accumulation")
    g.add_argument('--max_steps', type=pos_int, help="optimizer steps (also the length of the cosine schedule)")
    g.add_argument('--lr', type=pos, help="peak learning rate of the tokenizer")
    g.add_argument('--encoder_lr_scale', type=number(float, 1e-9), help="the encoder's (and latent tokens') lr is "
                   "this times the rest's (1 in the release)")
    g.add_argument('--end_lr', type=pos, help="learning rate at the end of the cosine decay")
    g.add_argument('--warmup_steps', type=number(int, 0), help="linear warm-up steps (tokenizer and discriminator)")
    g.add_argument('--weight_decay', type=pos, help="AdamW weight decay (not on norms, biases, embeddings)")
    g.add_argument('--beta1', type=number(float, 0, 0.9999), default=0.9, help="AdamW beta1 (default 0.9)")
    g.add_argument('--beta2', type=number(float, 0, 0.9999), help="AdamW beta2")
    g.add_argument('--grad_clip', type=pos, default=1.0, help="max gradient norm, tokenizer and discriminator "
                   "apart (default 1.0)")
    g.add_argument('--ema_decay', type=number(float, 0, 1), default=0.999, help="EMA decay, after the release's "
                   "warm-up (default 0.999)")
    g = p.add_argument_group('losses')
    g.add_argument('--perceptual', choices=['lpips-convnext', 'lpips', 'none'], help="perceptual loss: LPIPS "
                   "(VGG16) + 0.1 ConvNeXt-S logit MSE (the release's), LPIPS only, or none; weights from torch.hub")
    g.add_argument('--perceptual_weight', type=pos, default=1.0, help="weight of the perceptual loss (default 1)")
    g.add_argument('--convnext_weight', type=pos, default=0.1, help="weight of its ConvNeXt-S term (default 0.1)")
    g.add_argument('--quantizer_weight', type=pos, default=1.0, help="VQ: weight of commitment + codebook loss "
                   "(default 1)")
    g.add_argument('--cluster_vq', choices=['on', 'off'], default='on', help="VQ: the release's clustering_vq, "
                   "rarely used codes pulled toward the encoder's features every step (default on)")
    g.add_argument('--kl_weight', type=pos, default=1e-6, help="KL: weight of the KL term (default 1e-6)")
    g.add_argument('--disc_start', type=number(int, -1), help="step at which the GAN (discriminator training, the "
                   "adversarial term, LeCAM) switches on; -1: never")
    g.add_argument('--disc_weight', type=pos, default=0.1, help="weight of the adversarial loss (default 0.1)")
    g.add_argument('--disc_lr', type=pos, help="peak learning rate of the discriminator")
    g.add_argument('--disc_width', type=number(int, 32), help="discriminator base channels (the release's: 128)")
    g.add_argument('--lecam_weight', type=pos, default=0.001, help="LeCAM weight, EMA decay 0.999 (default 0.001)")
    g = p.add_argument_group('output')
    g.add_argument('--out_dir', help="where ckpt.pt, metrics.jsonl and recon grids go")
    g.add_argument('--log_every', type=pos_int, help="steps between log lines")
    g.add_argument('--eval_every', type=pos_int, help="steps between held-out PSNR and a recon grid (EMA model)")
    g.add_argument('--eval_images', type=pos_int, help="held-out images per evaluation")
    g.add_argument('--ckpt_every', type=pos_int, help="steps between checkpoints (and one at the end)")
    add_system_flags(p, 'tokenizer', 'the KL noise')
    args = p.parse_args(argv)
    if args.preset is None and args.tokens not in OFFICIAL_TOKENS:
        p.error(f"pass --tokens {'|'.join(OFFICIAL_TOKENS)} (an official recipe) or --preset shapes (CPU quickstart)")
    if args.preset is None:
        recipe, args.model = 'official', args.tokens
    else:
        args.tokens = args.tokens or 'vq'
        if args.tokens not in ('vq', 'kl'):
            p.error(f"--preset {args.preset} takes --tokens vq or kl, not {args.tokens!r}")
        recipe, args.model = args.preset, f"{args.preset}-{args.tokens}"
    for k, v in RECIPES.get(f"{recipe}-{args.tokens}", RECIPES[recipe]).items():  # shapes-kl has its own
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.out_dir is None and recipe == 'official':
        args.out_dir = f"out/tatitok-{args.tokens}"
    if args.out_dir is None:
        args.out_dir = f"out/{args.preset}-tokenizer" + ('-kl' if args.tokens == 'kl' else '')
    if args.data is None:
        p.error("--data is required with an official recipe (tar shards, a glob, or a folder of images)")
    try:
        pick_dtype(args.dtype, pick_device(args.device))
    except ValueError as e:
        p.error(str(e))
    return args

# -----------------------------------------------------------------------------

def main(args, state):
    rank, world, device = init_distributed(args.device)
    master = rank == 0
    dtype = pick_dtype(args.dtype, device)
    ctx = autocast(device, dtype)
    micro_batches(args.batch_size, args.micro_batch_size, world)  # a batch no split serves stops here
    expand_source(args.data)  # a missing or empty source stops here, before any model is built
    if args.eval_data != 'none':
        expand_source(args.eval_data)

    # rank 0 decides whether to resume, from its own --out_dir, and reads the checkpoint; every rank
    # gets what it says, and the state from rank 0
    keep = {}

    def decide():
        make_out_dir(args.out_dir)
        ckpt, changed = open_checkpoint(args.out_dir, args.resume, 'train_tokenizer', vars(args), MODEL_FLAGS)
        keep['ckpt'] = ckpt
        return changed, ckpt and {k: ckpt[k] for k in ('model_args', 'text_encoder', 'step', 'nonfinite', 'data')}
    changed, resumed = on_rank0(decide, world, UserError)
    ckpt = keep.get('ckpt')

    # the frozen text encoder and the tokenizer: the same init on every rank (DDP also broadcasts rank 0's)
    torch.manual_seed(args.seed)
    text_encoder, raw_model = build(args, resumed)
    cfg = raw_model.config
    vq = cfg.quantize == 'vq'
    memory = None
    if device.type == 'cuda':
        memory = torch.cuda.get_device_properties(device).total_memory
    choice = plan_run(args, cfg, sum(p.numel() for p in text_encoder.parameters()), world, memory)
    mb, grad_accum = choice['micro_batch'], choice['grad_accum']
    raw_model.encoder.checkpointing = raw_model.decoder.checkpointing = choice['checkpointing']
    text_encoder.to(device)
    raw_model.to(device)
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval()
    disc_raw = Discriminator(args.disc_width).to(device)
    perceptual = None
    if args.perceptual != 'none':
        perceptual = PerceptualLoss(args.perceptual).to(device)

    # data: the global sample g is the same image, with the same KL noise, on any number of processes;
    # the release's tokenizer reads each image's caption as it is (recap_prob=0)
    prepare = functools.partial(prepare_sample, tokenizer=text_encoder.tokenizer,
                                context_length=text_encoder.context_length, noise=None if vq else
                                (cfg.num_latent_tokens, cfg.token_size), seed=args.seed)
    train_loader = make_loader(args.data, mb, cfg.image_size, seed=args.seed, rank=rank, world_size=world,
                               num_workers=args.num_workers, flip=True, recap_prob=0, prepare=prepare)
    eval_loader = None
    if args.eval_data != 'none' and master:
        eval_loader = make_loader(args.eval_data, mb, cfg.image_size, train=False, seed=args.seed, recap_prob=0)

    # optimizers (the encoder's groups at encoder_lr_scale x the lr), scalers, and the state a checkpoint keeps
    betas = (args.beta1, args.beta2)
    opt = raw_model.configure_optimizers(args.weight_decay, args.lr, betas, device.type, args.encoder_lr_scale)
    opt_d = torch.optim.AdamW(param_groups(disc_raw.named_parameters(), args.weight_decay), lr=args.disc_lr,
                              betas=betas, fused=True)
    if choice['zero']:
        opt, opt_d = shard_optimizer(opt), shard_optimizer(opt_d)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    scaler_d = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    lecam_ema = torch.zeros(2, device=device)  # EMAs of the mean real and fake logits
    embed_prob = torch.zeros(cfg.codebook_size if vq else 0, device=device)  # VQ clustering: EMA of code usage
    start_step, nonfinite = 0, torch.zeros((), dtype=torch.long, device=device)
    if ckpt:
        raw_model.load_state_dict(ckpt['model'])
        ema.load_state_dict(ckpt['ema'])
        disc_raw.load_state_dict(ckpt['disc'])
        lecam_ema.copy_(ckpt['lecam_ema'])
        embed_prob.copy_(ckpt['embed_prob'])
        for k, obj in (('scaler', scaler), ('disc_scaler', scaler_d)):
            obj.load_state_dict(ckpt[k])
        if world == 1:
            opt.load_state_dict(ckpt['optimizer'])
            opt_d.load_state_dict(ckpt['disc_optimizer'])
    if resumed:
        start_step = resumed['step']
        nonfinite.fill_(resumed['nonfinite'])
        train_loader.load_state_dict(resumed['data'])
    if world > 1:  # rank 0's EMA, discriminator, clustering and LeCAM state, optimizers on every rank
        for t in [*ema.state_dict().values(), *disc_raw.state_dict().values(), lecam_ema, embed_prob]:
            dist.broadcast(t, 0)
        if resumed:
            opt.load_state_dict(broadcast_state(ckpt and ckpt['optimizer'], device, world))
            opt_d.load_state_dict(broadcast_state(ckpt and ckpt['disc_optimizer'], device, world))
            for k, obj in (('scaler', scaler), ('disc_scaler', scaler_d)):
                obj.load_state_dict(on_rank0(lambda: obj.state_dict(), world, UserError))
    ckpt = None  # free the memory

    model, disc = raw_model, disc_raw
    if args.compile == 'on' or (args.compile == 'auto' and device.type == 'cuda'):
        model = torch.compile(model)
    if world > 1:  # rank 0's weights are broadcast here; no buffer changes in training
        ddp = dict(device_ids=[device.index] if device.type == 'cuda' else None, gradient_as_bucket_view=True,
                   broadcast_buffers=False)
        model, disc = DDP(model, **ddp), DDP(disc_raw, **ddp)

    # the resolved configuration, printed and kept in every checkpoint
    if master:
        print(json.dumps(dict(**vars(args), model_args=asdict(cfg), world_size=world, grad_accum=grad_accum,
                              device_used=str(device), params=raw_model.get_num_params()), indent=1))
        print(f"global batch {args.batch_size} = {mb} per forward x {world} processes x {grad_accum} "
              f"accumulation; data: {train_loader.stream.streams} streams, "
              f"{train_loader.stream.num_workers} workers per process")
        if memory:
            print(plan_lines(choice, memory))
        if changed:
            print(f"resuming at step {start_step} with changed flags (saved, now): {changed}")

    batches = iter(train_loader)
    flops = 3 * raw_model.estimate_flops() * args.batch_size  # per optimizer step; the tokenizer's matmuls only
    # what the log reads, accumulated on the device and read every --log_every steps only
    smooth, bad_run, t_log, step_log = {}, torch.zeros((), dtype=torch.long, device=device), time.time(), start_step
    step, saved = start_step, resumed and start_step
    state['interrupted'] = lambda: interrupted_at(step, saved, args.out_dir)
    for step in range(start_step, args.max_steps + 1):
        last = step == args.max_steps
        # once in a while: held-out PSNR and a recon grid (rank 0, EMA weights)
        if eval_loader is not None and (last or step % args.eval_every == 0):
            print(evaluate(ema, text_encoder, eval_loader, args, device, ctx, step), flush=True)
        # once in a while: a checkpoint (never at the start step: nothing new to save)
        if step > start_step and (last or step % args.ckpt_every == 0):
            data_states = merge_states(all_gather_objects(train_loader.state_dict(), world))
            opt_state, opt_d_state = optimizer_state(opt), optimizer_state(opt_d)
            if master:
                ckpt = dict(model=raw_model.state_dict(), ema=ema.state_dict(), disc=disc_raw.state_dict(),
                            optimizer=opt_state, disc_optimizer=opt_d_state, scaler=scaler.state_dict(),
                            disc_scaler=scaler_d.state_dict(), script='train_tokenizer', model_args=asdict(cfg),
                            text_encoder=text_encoder.spec, config=vars(args), step=step,
                            nonfinite=nonfinite.item(), data=data_states, lecam_ema=lecam_ema.cpu(),
                            embed_prob=embed_prob.cpu())
                save_checkpoint(ckpt, os.path.join(args.out_dir, 'ckpt.pt'))
                ckpt = opt_state = opt_d_state = None
                print(f"saved {args.out_dir}/ckpt.pt (step {step})", flush=True)
            saved = step
            if world > 1:  # within the process group's timeout, which init_distributed sized for it
                dist.barrier()
        if last:
            break

        # one optimizer step over the global batch, in micro batches; nothing here waits on the GPU
        lr = get_lr(step, args.lr, args.warmup_steps, args.max_steps, args.end_lr)
        for group in opt.param_groups:
            group['lr'] = lr * group['lr_scale']
        gan = gan_on(step, args.disc_start)  # the GAN phase: D trains, G gets the adversarial term
        if gan:
            # the release's D schedule, from disc_start over the remaining steps (README: differences)
            lr_d = get_lr(step - args.disc_start, args.disc_lr, args.warmup_steps, args.max_steps - args.disc_start,
                          args.end_lr * args.disc_lr / args.lr)
            for group in opt_d.param_groups:
                group['lr'] = lr_d
        terms, feats, pairs = {}, [], []
        for micro in range(grad_accum):
            batch = to_device(next(batches), device)
            img = batch['image'].float() / 255  # (B, 3, H, W), uint8 until here
            if world > 1:  # all-reduce the gradients on the last micro step only (nanoGPT's flag)
                model.require_backward_grad_sync = micro == grad_accum - 1
            guidance = text_encoder(batch['ids'])['guidance']  # (B, 77, W), frozen CLIP in fp32, as released
            with ctx:
                recon, aux = model(img, guidance, noise=batch.get('noise'))
            loss, t = generator_loss(img, recon, aux, args, perceptual, disc_raw if gan else None)
            scaler.scale(loss / grad_accum).backward()
            if vq:  # the encoder's features, for the codebook clustering before the step
                feats.append((aux['features'], aux['ids'], batch['index']))
            if gan:  # kept for the discriminator, which needs the whole batch's mean logits first
                pairs.append((img, recon.detach()))
            for k, v in t.items():
                terms[k] = terms.get(k, 0.0) + v.detach().float().mean() / grad_accum
        if gan:  # the discriminator on the same images and reconstructions, as released
            t, lecam_ema_next = discriminator_backward(disc, pairs, lecam_ema, args.lecam_weight,
                                                       scaler_d, world)
            terms.update({k: v.float().mean() for k, v in t.items()})
        gnorm, finite = optimizer_step(opt, scaler, raw_model.parameters(), args.grad_clip)
        if gan:  # both step, or neither: a non-finite discriminator skips the tokenizer's step too
            _, d_finite = optimizer_step(opt_d, scaler_d, disc_raw.parameters(), args.grad_clip)
            finite = finite & d_finite
            lecam_ema.copy_(torch.where(finite, lecam_ema_next, lecam_ema))
        if vq and args.cluster_vq == 'on':  # the release's in-forward rewrite does not change the gradient
            cluster_global(raw_model.quantize, embed_prob, feats, world, finite)
        update_ema(ema, raw_model, step, args.ema_decay, finite)
        opt.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        bad = (~finite).long()
        nonfinite += bad
        bad_run = (bad_run + 1) * bad
        for k, v in terms.items():  # a debiased EMA of each term, for reading
            smooth[k] = 0.9 * smooth.get(k, 0.0) + 0.1 * v

        # logging, every --log_every steps: the one place the host reads what the GPU computed
        if step % args.log_every == 0 or step == args.max_steps - 1:
            keys = sorted(terms)  # every term, averaged over micro steps and ranks
            vals = torch.stack([terms[k] for k in keys])
            if world > 1:
                dist.all_reduce(vals)
                vals /= world
            if device.type == 'cuda':
                torch.cuda.synchronize()
            dt = (time.time() - t_log) / (step + 1 - step_log)  # per step, since the last log line
            t_log, step_log = time.time(), step + 1
            debias = 1 - 0.9 ** (step + 1 - start_step)
            if master:
                c = train_loader.counts  # this rank's
                line = ' | '.join(f"{k} {v.item() / debias:.4g}" for k, v in smooth.items())
                mfu = flops / dt / (peak_flops(device) * world)
                print(f"step {step}/{args.max_steps} | {line} | gnorm {gnorm.item():.3g} | lr {lr:.2e} | "
                      f"dt {dt * 1000:.0f}ms | img/s {args.batch_size / dt:.1f} | mfu {100 * mfu:.1f}% | "
                      f"read {c['read']} skipped {c['filtered'] + c['corrupt']} | nonfinite {nonfinite.item()}",
                      flush=True)
                row = dict(step=step, lr=lr, gnorm=gnorm.item(), **dict(zip(keys, vals.tolist())))
                with open(os.path.join(args.out_dir, 'metrics.jsonl'), 'a') as f:
                    f.write(json.dumps(row) + '\n')
            stop_if_nonfinite(bad_run.item(), args.max_nonfinite, args.out_dir, master)
    if world > 1:
        dist.destroy_process_group()

if __name__ == '__main__':
    run_main(main, get_args(), UserError)
