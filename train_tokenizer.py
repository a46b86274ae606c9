"""
Train TA-TiTok with the official one-stage recipe: L2 + perceptual (LPIPS + 0.1 ConvNeXt-S) + VQ or KL terms, a
blur-pool PatchGAN with hinge loss and LeCAM, AdamW, cosine schedule, EMA. From one CPU to many GPUs.

CPU quickstart (32 px shapes, tiny random text tower, no downloads):
$ python train_tokenizer.py --preset shapes                 # VQ tokens, outputs in out/shapes-tokenizer
$ python train_tokenizer.py --preset shapes --tokens kl     # continuous tokens, outputs in out/shapes-tokenizer-kl
$ python train_tokenizer.py --preset shapes --max_steps 20  # CI smoke run
One GPU, or one node of 8 GPUs (the global batch stays fixed, so both train the same model):
$ python train_tokenizer.py --tokens vq128 --data 'shards/{00000..09999}.tar' --eval_data 'val/{0000..0009}.tar'
$ torchrun --standalone --nproc_per_node=8 train_tokenizer.py --tokens vq128 --data ... --eval_data ...
Several nodes (run on each, with its --node_rank):
$ torchrun --nnodes=4 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
    train_tokenizer.py --tokens vq128 --data ... --eval_data ...
Continue a run that was killed, bitwise the same as never stopping (on CPU): the same command plus --resume.

References:
1) the paper: https://arxiv.org/abs/2501.07730
2) the official code: https://github.com/bytedance/1d-tokenizer (modeling/modules/{losses,perceptual_loss,lpips,
   discriminator,ema_model}.py, utils/{train_utils,lr_schedulers}.py)
3) LPIPS: https://arxiv.org/abs/1801.03924, weights as in https://github.com/CompVis/taming-transformers
4) LeCAM: https://arxiv.org/abs/2104.03310
5) nanoGPT train.py, whose shape this file follows: https://github.com/karpathy/nanoGPT
"""
import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from PIL import Image

from tatitok import (TATiTok, TATiTokConfig, TextEncoder, CheckpointError, tatitok_config,
                     load_official, load_state_dict_file)
from data import make_loader, DataError

# -----------------------------------------------------------------------------
# perceptual loss: LPIPS (VGG16) + 0.1 x MSE of ConvNeXt-S logits, as the release's "lpips-convnext_s-1.0-0.1"
# Hand-written nets whose parameter names match torchvision's release files, so the standard ImageNet weights load
# with a strict key check and torchvision never needs importing (style rule: no torchvision in our code); the
# test builds torchvision's models once to prove the key layouts match.

WEIGHTS = {  # file name -> (url, hash); torchvision files carry a sha256 prefix in the name, LPIPS an md5
    'vgg16-397923af.pth': ('https://download.pytorch.org/models/vgg16-397923af.pth', None),
    'convnext_small-0c510722.pth': ('https://download.pytorch.org/models/convnext_small-0c510722.pth', None),
    'vgg_lpips.pth': ('https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1', 'd507d7349b931f0638a25a48a722f98a'),
}

def hub_weights(name):
    """A state dict from torch.hub's cache (~/.cache/torch/hub/checkpoints), downloaded on first use."""
    url, md5 = WEIGHTS[name]
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', name)
    try:
        if not os.path.exists(path):  # fail fast when offline, instead of urllib's long wait
            import socket
            socket.create_connection((url.split('/')[2], 443), timeout=3).close()
        sd = torch.hub.load_state_dict_from_url(url, file_name=name, map_location='cpu', check_hash=md5 is None,
                                                weights_only=True, progress=False)
    except Exception as e:  # offline, proxy, truncated file: all the same to the user
        raise CheckpointError(f"cannot get the perceptual-loss weights {name} ({type(e).__name__}); download {url} "
                              f"to {path} on a machine with internet, or train without it: --perceptual none")
    if md5 and hashlib.md5(open(path, 'rb').read()).hexdigest() != md5:
        raise CheckpointError(f"{path}: md5 mismatch, delete it and retry")
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
    """torchvision convnext_small: stages of (96, 3), (192, 3), (384, 27), (768, 3)."""

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
    """torchvision vgg16().features[:30], up to relu5_3 (the part LPIPS reads)."""
    layers, c = [], 3
    for v in (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512):
        layers += [nn.MaxPool2d(2)] if v == 'M' else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
        c = c if v == 'M' else v
    return nn.Sequential(*layers)

class PerceptualLoss(nn.Module):
    """lpips + convnext_weight * mse(logits): the release's (1.0 lpips + 0.1 convnext) / 1.1 times weight 1.1."""
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
            vgg = {k[len('features.'):]: v for k, v in hub_weights('vgg16-397923af.pth').items() if k.startswith('features.')}
            load_official(self.features, {k: v for k, v in vgg.items() if int(k.split('.')[0]) < 30}, 'vgg16-397923af.pth')
            lin = {k: v for k, v in hub_weights('vgg_lpips.pth').items() if k.startswith('lin')}  # 5 x 'linI.model.1.weight'
            load_official(self.lins, lin, 'vgg_lpips.pth', rename=[(f'lin{i}.model.1.', f'{i}.') for i in range(5)])
            if self.convnext is not None:
                load_official(self.convnext, hub_weights('convnext_small-0c510722.pth'), 'convnext_small-0c510722.pth')
        self.requires_grad_(False).eval()

    def lpips(self, x, y):
        h = (torch.cat([x, y]) * 2 - 1 - self.shift) / self.scale  # (2B, 3, H, W): LPIPS wants [-1, 1], then scaling
        loss, lins = 0, iter(self.lins)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.TAPS:
                f = h.float()  # fp32 for the unit-normalisation over channels and the squared difference
                fx, fy = (f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)).chunk(2)
                w = next(lins).weight.view(1, -1, 1, 1)  # the 1x1 'lin' conv, as a weighted channel sum kept in fp32
                loss = loss + ((fx - fy) ** 2 * w).sum(1).mean((1, 2))  # (B,) spatial average
        return loss.mean()

    def forward(self, x, y, convnext_weight=0.1):
        loss = self.lpips(x, y)
        if self.convnext is not None:
            z = F.interpolate(torch.cat([x, y]), size=224, mode='bilinear', align_corners=False, antialias=True)
            lx, ly = self.convnext((z - self.mean) / self.std).float().chunk(2)
            loss = loss + convnext_weight * F.mse_loss(lx, ly)
        return loss

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
        self.block_in = nn.Sequential(nn.Conv2d(3, width, 5, padding=2), act())  # Conv2dSame == odd-k padding k//2
        chans = [width] + [width * 2 ** i for i in range(stages)]
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(a, b, 3, padding=1), BlurPool(), nn.GroupNorm(32, b), act())
                                     for a, b in zip(chans[:-1], chans[1:])])
        self.pool = nn.AdaptiveMaxPool2d((16, 16))
        self.to_logits = nn.Sequential(nn.Conv2d(chans[-1], chans[-1], 1), act(), nn.Conv2d(chans[-1], 1, 5, padding=2))

    def forward(self, x):
        x = self.block_in(x)
        for block in self.blocks:
            x = block(x)
        return self.to_logits(self.pool(x))

# -----------------------------------------------------------------------------
# small runs and the codebook

@torch.no_grad()
def small_run_init(tok):
    """--init small, the shapes recipe's: two changes to the release's init that take a 1M-parameter tokenizer off
    the mean-image plateau within its 5-minute budget (the architecture, and so the checkpoint layout, is unchanged).
    1. The encoder's Linear and Conv weights get torch's default init, as the release's decoder already does: at
       std 0.02 the image reaches the latent tokens only as a ~5% part of their residual stream.
    2. The image grids' position embeddings (encoder patches, decoder queries) start as a 2D sin-cos table (MAE's),
       so where a patch sits is readable from step 0 instead of learned from random vectors.
    Measured with an unquantized bottleneck, 600 steps of 16 (a stripped-down loop): release 17.35 dB, 1. alone
    17.64, 2. alone 18.08, both 20.16."""
    for m in tok.encoder.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.reset_parameters()
    for pe in (tok.encoder.positional_embedding, tok.decoder.positional_embedding):
        grid, W = int((pe.shape[0] - 1) ** 0.5), pe.shape[1]  # row 0 is the class token's, kept random
        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')  # (grid, grid) each
        freqs = 100.0 ** (-torch.arange(W // 4) / (W // 4))  # (W/4,) from 1 down to ~1/100 cycles per patch
        x, y = xs.flatten()[:, None] * freqs, ys.flatten()[:, None] * freqs  # (P, W/4) each
        pe[1:] = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).to(pe)  # (P, W)

@torch.no_grad()
def cluster_codebook(codebook, embed_prob, features, ids, decay=0.99, l2=False):
    """The release's clustering_vq (CVQ-VAE, https://arxiv.org/abs/2307.15139), training only: each code moves toward
    its closest encoder feature in the batch, by exp(-10 K usage / (1 - decay)): rarely used codes all the way.
    features (n, C) and ids (n,) of the whole global batch, so the update is the same for any world size.
    l2: the quantizer's use_l2_norm; closeness is then measured on the sphere, and the raw feature is the anchor."""
    K = codebook.shape[0]
    counts = torch.bincount(ids, minlength=K).float()
    embed_prob.mul_(decay).add_(counts / counts.sum(), alpha=1 - decay)  # EMA of each code's share of the tokens
    best_d, anchor = torch.full((K,), float('inf'), device=codebook.device), torch.zeros_like(codebook)
    e = F.normalize(codebook, dim=-1) if l2 else codebook
    for f in features.split(8192):  # the closest feature to each code, a chunk of features at a time
        fn = F.normalize(f, dim=-1) if l2 else f
        d = fn.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * fn @ e.t()  # (n, K)
        d_min, i = d.min(0)
        better = d_min < best_d
        best_d, anchor[better] = torch.where(better, d_min, best_d), f[i[better]]
    alpha = torch.exp(-embed_prob * K * 10 / (1 - decay) - 1e-3)[:, None]  # (K, 1)
    codebook.mul_(1 - alpha).add_(anchor * alpha)

# -----------------------------------------------------------------------------
# recipes: every flag left at None takes its value from here

OFFICIAL_TOKENS = ('vq32', 'vq64', 'vq128', 'kl32', 'kl64', 'kl128')
RECIPES = {
    # the release's configs/training/TA-TiTok/*.yaml; the global batch is UNCONFIRMED (32 per GPU x 8 assumed)
    'official': dict(batch_size=256, micro_batch_size=32, max_steps=650_000, lr=1e-4, encoder_lr_scale=1.0,
                     end_lr=1e-5, warmup_steps=10_000, weight_decay=1e-4, beta2=0.999, disc_start=200_000,
                     disc_lr=1e-4, disc_width=128, perceptual='lpips-convnext', clip='ViT-L-14-336:openai', data=None,
                     eval_data=None, eval_images=1000, log_every=100, eval_every=10_000, ckpt_every=5_000,
                     num_workers=8, init='release'),
    # CPU quickstart: 32 px shapes, random tiny text tower, no perceptual loss (no downloads). No GAN, however long
    # the run (switched on at step 800 it collapsed the codebook: 21.36 -> 15.45 dB by step 1200, 2-3x the step time).
    # 2700 steps: 259 s on 2 cores on a slow day (~174 img/s; 3300 steps took 316 s that day, 241-295 s on others).
    # Peak lr 6e-3 after 500 warm-up steps, the encoder's (and latent tokens') at a third of it, 2e-3. A high lr for the
    # decoder and codebook is what moves VQ; at 4e-3 for the encoder too, its features fell onto one code per token
    # position (seed 42: usage 4%, 19.35 dB at step 825, 21.76 at the end; the text alone gives 19.6).
    # Measured with the release's commitment weight (0.25), 3300 steps, 1 thread, seed 42 / 1: 2e-3 for all 25.43 /
    # 26.88 dB; 4e-3, encoder 2e-3: 27.00 / 27.74; 6e-3, encoder 2e-3: 27.36 / 28.24 (seeds 0 / 2: 28.10 / 28.42);
    # 8e-3, encoder 2e-3: 25.58 (seed 42). The 500 warm-up steps matter: with 300 the codebook collapsed as above, and
    # so it did with the codebook at the encoder's lr. Without the commitment loss (the shapes-vq preset in tatitok.py
    # now): 29.77 dB (seed 42, 1 thread); with 2 threads 30.17 dB after 3300 steps, 29.39 dB after these 2700
    'shapes': dict(batch_size=16, micro_batch_size=None, max_steps=2700, lr=6e-3, encoder_lr_scale=1/3, end_lr=6e-4,
                   warmup_steps=500, weight_decay=1e-4, beta2=0.99, disc_start=-1, disc_lr=1e-4, disc_width=32,
                   perceptual='none', clip='tiny', data='shapes', eval_data='shapes:val',
                   eval_images=256, log_every=100, eval_every=675, ckpt_every=1350, num_workers=0, init='small'),
    # tests: 32 px, a few steps
    'tiny': dict(batch_size=8, micro_batch_size=None, max_steps=10, lr=1e-3, encoder_lr_scale=1.0, end_lr=1e-4,
                 warmup_steps=2, weight_decay=1e-4, beta2=0.999, disc_start=4, disc_lr=1e-4, disc_width=32,
                 perceptual='none', clip='tiny', data='shapes', eval_data='shapes:val',
                 eval_images=16, log_every=1, eval_every=1000, ckpt_every=5, num_workers=0, init='release'),
}
# the shapes quickstart with KL tokens: the same split of learning rates, the encoder at the 1e-3 it had before.
# 1 thread, seed 42: 28.98 dB after 3300 steps (1e-3 for all, the previous recipe: 27.31; 28.11 after 4200 steps,
# which took 329 s in a slow session), so 3000 steps: 28.63 dB in 262 s. 2e-3 for the encoder too reached 28.38 dB
# in 3600 steps, but the KL generator trained on those tokens drew the right shape only 75.0-82.3% of the time (four
# seeds); on these, 80.2-87.5%
RECIPES['shapes-kl'] = {**RECIPES['shapes'], 'max_steps': 3000, 'eval_every': 750, 'ckpt_every': 1500,
                        'lr': 3e-3, 'end_lr': 3e-4, 'warmup_steps': 500}

def get_args(argv=None):
    class Formatter(argparse.ArgumentDefaultsHelpFormatter):  # no "(default: None)" for recipe-filled flags
        def _get_help_string(self, action):
            return action.help if action.default is None else super()._get_help_string(action)
    p = argparse.ArgumentParser(description="Train TA-TiTok (official one-stage recipe), on CPU or GPUs (torchrun). "
                                "Flags shown without a default take it from the recipe: --tokens vq128 etc. (official) "
                                "or --preset shapes|tiny; see RECIPES in this file.", formatter_class=Formatter)
    g = p.add_argument_group('model')
    g.add_argument('--tokens', default=None, help="official release to train: vq32|vq64|vq128|kl32|kl64|kl128 "
                   "(its architecture and recipe); with --preset: vq or kl (default vq)")
    g.add_argument('--preset', default=None, choices=['shapes', 'tiny'],
                   help="small recipe instead of an official one: shapes (CPU quickstart, 32 px), tiny (tests, 32 px)")
    g.add_argument('--clip', default=None, help="text encoder: 'tiny' (random, no download) or MODEL:PRETRAINED of "
                   "open_clip, e.g. ViT-L-14-336:openai (the release's); default from the recipe")
    g.add_argument('--init', default=None, choices=['release', 'small'], help="weight init: the release's, or "
                   "'small' (torch default encoder weights, 2D sin-cos grid positions) for tiny fast runs")
    g = p.add_argument_group('data')
    g.add_argument('--data', default=None, help="training images: tar shards ('d/{00000..00099}.tar'), a glob, a "
                   "folder of images + .txt captions, or 'shapes'")
    g.add_argument('--eval_data', default=None, help="held-out images for PSNR and grids (same forms, or "
                   "'shapes:val'); 'none' to skip")
    g.add_argument('--num_workers', type=int, default=None, help="data loader workers per process")
    g = p.add_argument_group('optimization')
    g.add_argument('--batch_size', type=int, default=None, help="GLOBAL batch (images per optimizer step, all processes)")
    g.add_argument('--micro_batch_size', type=int, default=None, help="images per process per forward; gradient "
                   "accumulation = batch_size / (micro_batch_size x processes). Default: no accumulation")
    g.add_argument('--max_steps', type=int, default=None, help="optimizer steps (also the length of the cosine schedule)")
    g.add_argument('--lr', type=float, default=None, help="peak learning rate of the tokenizer")
    g.add_argument('--encoder_lr_scale', type=float, default=None, help="the encoder's (and latent tokens') lr is "
                   "this times the tokenizer's; 1 in the release. Shapes: below 1, so a high decoder lr does not "
                   "collapse the codebook")
    g.add_argument('--end_lr', type=float, default=None, help="learning rate at the end of the cosine decay")
    g.add_argument('--warmup_steps', type=int, default=None, help="linear warmup steps (tokenizer and discriminator)")
    g.add_argument('--weight_decay', type=float, default=None, help="AdamW weight decay (not on norms, biases, embeddings)")
    g.add_argument('--beta1', type=float, default=0.9, help="AdamW beta1")
    g.add_argument('--beta2', type=float, default=None, help="AdamW beta2")
    g.add_argument('--grad_clip', type=float, default=1.0, help="max gradient norm (tokenizer and discriminator apart)")
    g.add_argument('--ema_decay', type=float, default=0.999, help="EMA decay of the tokenizer (after a warm-up)")
    g = p.add_argument_group('losses')
    g.add_argument('--perceptual', default=None, choices=['lpips-convnext', 'lpips', 'none'],
                   help="perceptual loss: LPIPS(VGG16) + 0.1 ConvNeXt-S logit MSE (release), LPIPS only, or none "
                   "(offline / tiny runs); weights from torch.hub's cache")
    g.add_argument('--perceptual_weight', type=float, default=1.0, help="weight of the perceptual loss")
    g.add_argument('--convnext_weight', type=float, default=0.1, help="weight of the ConvNeXt-S term inside it")
    g.add_argument('--quantizer_weight', type=float, default=1.0, help="VQ: weight of commitment + codebook loss")
    g.add_argument('--cluster_vq', type=int, default=1, choices=[0, 1], help="VQ: the release's clustering_vq "
                   "(dead codes re-initialised toward the encoder's features every step)")
    g.add_argument('--kl_weight', type=float, default=1e-6, help="KL: weight of the KL term")
    g.add_argument('--disc_start', type=int, default=None, help="step at which the GAN (D training, G adversarial "
                   "term, LeCAM) switches on; -1: never")
    g.add_argument('--disc_weight', type=float, default=0.1, help="weight of the generator's adversarial loss")
    g.add_argument('--disc_lr', type=float, default=None, help="peak learning rate of the discriminator")
    g.add_argument('--disc_width', type=int, default=None, help="discriminator base channels (release: 128)")
    g.add_argument('--lecam_weight', type=float, default=0.001, help="LeCAM regularisation weight (EMA decay 0.999)")
    g = p.add_argument_group('logging, evaluation, checkpoints')
    g.add_argument('--out_dir', default=None, help="where ckpt.pt, log.txt, config.json and recon PNGs go")
    g.add_argument('--log_every', type=int, default=None, help="steps between log lines")
    g.add_argument('--eval_every', type=int, default=None, help="steps between held-out PSNR + recon grid (EMA model)")
    g.add_argument('--eval_images', type=int, default=None, help="held-out images per evaluation")
    g.add_argument('--ckpt_every', type=int, default=None, help="steps between checkpoints (and at the end)")
    g = p.add_argument_group('system')
    g.add_argument('--resume', action='store_true', help="continue from OUT_DIR/ckpt.pt (starts fresh if there is none)")
    g.add_argument('--device', default='auto', help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, ...")
    g.add_argument('--dtype', default='auto', choices=['auto', 'bfloat16', 'float16', 'float32'],
                   help="autocast dtype on GPU (auto: bf16 if supported); losses and quantizer stay fp32; CPU is fp32")
    g.add_argument('--compile', default='auto', choices=['auto', 'on', 'off'], help="torch.compile (auto: on for CUDA)")
    g.add_argument('--seed', type=int, default=42, help="seed of the init, the data order and the KL noise")
    g.add_argument('--max_nonfinite', type=int, default=20, help="stop after this many non-finite steps in a row")
    args = p.parse_args(argv)
    if args.preset is None:
        if args.tokens not in OFFICIAL_TOKENS:
            p.error(f"pass --tokens {'|'.join(OFFICIAL_TOKENS)} (official recipe) or --preset shapes (CPU quickstart)")
        recipe, args.model = 'official', args.tokens
    else:
        args.tokens = args.tokens or 'vq'
        if args.tokens not in ('vq', 'kl'):
            p.error(f"--preset {args.preset} takes --tokens vq or kl, not {args.tokens!r}")
        recipe, args.model = args.preset, f"{args.preset}-{args.tokens}"
    for k, v in RECIPES.get(f"{recipe}-{args.tokens}", RECIPES[recipe]).items():  # shapes-kl has its own
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out_dir is None:
        args.out_dir = {'official': f"out/tatitok-{args.tokens}", 'shapes': 'out/shapes-tokenizer',
                        'tiny': 'out/tiny-tokenizer'}[recipe] + ('-kl' if args.tokens == 'kl' else '')
    if args.data is None:
        p.error("--data is required with an official recipe (tar shards, a glob, or a folder of images)")
    for k in ('batch_size', 'max_steps', 'log_every', 'eval_every', 'ckpt_every', 'eval_images', 'encoder_lr_scale'):
        if getattr(args, k) <= 0:
            p.error(f"--{k} must be positive")
    return args

# -----------------------------------------------------------------------------
# helpers

def get_lr(it, base, warmup, total, end):
    """Linear warmup to `base`, then cosine down to `end` at `total` (official utils/lr_schedulers.py)."""
    if it < warmup:
        return base * (it + 1) / warmup
    progress = min(1.0, (it - warmup) / max(1, total - warmup))
    return end + 0.5 * (base - end) * (1 + math.cos(math.pi * progress))

def param_groups(module, weight_decay):
    """The release's AdamW groups: no decay on 1-d params and on names with any of these substrings."""
    no_decay = ('ln', 'bias', 'latent_tokens', 'mask_token', 'embedding', 'norm', 'gamma', 'embed')
    decay, rest = [], []
    for n, p in module.named_parameters():
        (rest if p.ndim < 2 or any(s in n for s in no_decay) else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]

@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):  # parameters only: the tokenizer has no buffers
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)

def make_grid(rows):
    """List of (B, 3, H, W) tensors in [0, 1] -> one uint8 (rows*H, B*W, 3) image, 2 px grey gaps."""
    B, _, H, W = rows[0].shape
    out = np.full((len(rows) * (H + 2), B * (W + 2), 3), 200, np.uint8)
    for r, x in enumerate(rows):
        x = (x.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for b in range(B):
            out[r * (H + 2):r * (H + 2) + H, b * (W + 2):b * (W + 2) + W] = x[b]
    return out

def flops_per_image(cfg):
    """6 x matmul params x tokens + attention (the nanoGPT estimate), encoder + decoder; D and perceptual nets excluded."""
    P, out = (cfg.image_size // cfg.patch_size) ** 2, 0
    for W, L, T in ((cfg.enc_width, cfg.enc_layers, 1 + P + cfg.num_latent_tokens),
                    (cfg.dec_width, cfg.dec_layers, 1 + P + cfg.num_latent_tokens + cfg.text_context_length)):
        out += T * (6 * 12 * W * W * L + 12 * L * W * T)
    return out

def die(msg, code=2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)

# -----------------------------------------------------------------------------

def main(args):
    # distributed init: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; nccl on CUDA, gloo on CPU
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) if ddp else (0, 0, 1)
    device = args.device
    if device in ('auto', 'cuda'):
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else 'cpu'
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    if device_type == 'cuda':
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo')
    master = rank == 0
    print0 = lambda *a, **k: master and print(*a, **k, flush=True)
    if args.micro_batch_size is None:
        args.micro_batch_size = max(1, args.batch_size // world)
    mb = args.micro_batch_size
    if args.batch_size % (mb * world):
        die(f"--batch_size {args.batch_size} is not a multiple of micro_batch_size {mb} x {world} processes")
    grad_accum = args.batch_size // (mb * world)
    dtype = args.dtype if args.dtype != 'auto' else 'float32' if device_type == 'cpu' else \
        'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    ptdtype = dict(float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16)[dtype]
    ctx = nullcontext() if device_type == 'cpu' or dtype == 'float32' else torch.autocast(device_type, dtype=ptdtype)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 parts (quantizer, losses)
    torch.backends.cudnn.allow_tf32 = True
    compile_ = args.compile == 'on' or (args.compile == 'auto' and device_type == 'cuda')

    # a checkpoint to resume: architecture and text encoder come from it
    ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
    ckpt = None
    if os.path.exists(ckpt_path):
        if not args.resume:
            die(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out_dir")
        ckpt = load_state_dict_file(ckpt_path)  # weights_only; a CheckpointError if unreadable
        changed = {k: (v, getattr(args, k, None)) for k, v in ckpt['config'].items()
                   if k not in ('resume', 'micro_batch_size') and getattr(args, k, None) != v}
        print0(f"resuming from {ckpt_path} at step {ckpt['step']}" +
               (f"; flags changed (saved, now): {changed}" if changed else ''))
    elif args.resume:
        print0(f"--resume: no {ckpt_path} yet, starting from scratch")

    # text encoder (frozen, on the fly) and the tokenizer
    torch.manual_seed(args.seed)  # the same init on every rank (DDP also broadcasts rank 0's weights)
    if ckpt:
        text_encoder = TextEncoder.from_spec(ckpt['text_encoder'])
    elif args.clip == 'tiny':
        text_encoder = TextEncoder.tiny(context_length=tatitok_config(args.model).text_context_length)
    else:
        name, _, tag = args.clip.partition(':')
        text_encoder = TextEncoder.from_open_clip(name, tag or 'openai')
    text_encoder.to(device)
    cfg = TATiTokConfig(**ckpt['model_args']) if ckpt else \
        tatitok_config(args.model, text_embed_dim=text_encoder.width,  # the decoder reads this text width and length
                       text_context_length=text_encoder.context_length)
    raw_model = TATiTok(cfg)
    if args.init == 'small':
        small_run_init(raw_model)
    raw_model.to(device)
    vq = cfg.quantize == 'vq'
    disc_raw = Discriminator(args.disc_width).to(device)
    if ddp and local_rank != 0:
        dist.barrier()  # local rank 0 downloads the perceptual weights first, then the others read its cache
    perceptual = None if args.perceptual == 'none' else PerceptualLoss(args.perceptual).to(device)
    if ddp and local_rank == 0:
        dist.barrier()
    ema = copy.deepcopy(raw_model).requires_grad_(False).eval()

    # data: rank r reads every world-th sample, so the union of a step's batches is the same for any world size
    train_loader = make_loader(args.data, mb, cfg.image_size, train=True, seed=args.seed, rank=rank, world_size=world,
                               num_workers=args.num_workers, flip=True, resample=True)  # shards drawn as the release
    eval_loader = None if args.eval_data in (None, 'none') or not master else \
        make_loader(args.eval_data, mb, cfg.image_size, train=False, seed=args.seed, num_workers=min(2, args.num_workers))

    # optimizers, schedules, scalers
    fused = dict(fused=device_type in ('cuda', 'cpu'))  # one kernel for all tensors: on 2 CPU cores 1.5 ms vs 7.6
    betas = (args.beta1, args.beta2)
    encoder = {id(p) for n, p in raw_model.named_parameters() if n.startswith(('encoder.', 'latent_tokens'))}
    groups = [dict(g, params=[p for p in g['params'] if (id(p) in encoder) == enc],  # (decay, no decay) x (enc, rest)
                   lr_scale=args.encoder_lr_scale if enc else 1.0)
              for g in param_groups(raw_model, args.weight_decay) for enc in (True, False)]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=betas, **fused)
    opt_d = torch.optim.AdamW(param_groups(disc_raw, args.weight_decay), lr=args.disc_lr, betas=betas, **fused)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
    scaler_d = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
    lecam_ema = torch.zeros(2, device=device)  # EMA of the mean real / fake logits
    embed_prob = torch.zeros(cfg.codebook_size if vq else 0, device=device)  # VQ clustering: code usage EMA
    state = dict(model=raw_model, ema=ema, disc=disc_raw, optimizer=opt, disc_optimizer=opt_d, scaler=scaler,
                 disc_scaler=scaler_d, data=train_loader)  # what a checkpoint saves and resume restores
    step, nonfinite_total = 0, 0
    if ckpt:
        for k, obj in state.items():
            obj.load_state_dict(ckpt[k])  # data: the list of every rank's position, the loader takes its own
        lecam_ema.copy_(ckpt['lecam_ema'])
        embed_prob.copy_(ckpt['embed_prob'])
        step, nonfinite_total = ckpt['step'], ckpt['nonfinite']
        if len(ckpt['rng']) == world:  # nothing in training draws from them (noise is seeded per step), but still
            torch.set_rng_state(ckpt['rng'][rank]['cpu'])
            if device_type == 'cuda' and ckpt['rng'][rank]['cuda'] is not None:
                torch.cuda.set_rng_state(ckpt['rng'][rank]['cuda'])
        ckpt = None  # free memory
    else:
        update_ema(ema, raw_model, 0.0)  # synced init
    start_step = step

    # compile, then DDP
    model = raw_model
    if compile_:
        print0("compiling the tokenizer... (takes a minute)")
        model = torch.compile(model)
    disc = disc_raw
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
        disc = DDP(disc_raw, device_ids=[local_rank] if device_type == 'cuda' else None)

    # the resolved config, printed and saved
    derived = dict(world_size=world, grad_accum=grad_accum, device_used=device, dtype_used=dtype, compile_used=compile_,
                   params=raw_model.get_num_params(), disc_params=sum(p.numel() for p in disc_raw.parameters()))
    print0(json.dumps(dict(**vars(args), model_args=asdict(cfg), **derived), indent=1))
    print0(f"global batch {args.batch_size} = {mb} micro x {world} processes x {grad_accum} accumulation steps")
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, 'config.json'), 'w') as f:
            json.dump(dict(**vars(args), model_args=asdict(cfg), **derived), f, indent=1)
    logf = open(os.path.join(args.out_dir, 'log.txt'), 'a') if master else None

    def log(msg):
        print0(msg)
        if logf:
            logf.write(msg + '\n')
            logf.flush()

    def gather(obj):  # every rank's picklable object, as a list (the data position and RNG of each rank)
        if not ddp:
            return [obj]
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out

    def gather_tensors(x):  # same-shaped tensors of every rank, in rank order
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x)
        return out

    def save_checkpoint(step):
        rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if device_type == 'cuda' else None)
        data_states, rngs = gather(train_loader.state_dict()), gather(rng)
        if master:
            ckpt = {k: obj.state_dict() for k, obj in state.items() if k != 'data'}
            ckpt.update(model_args=asdict(cfg), text_encoder=text_encoder.spec, step=step, config=vars(args),
                        lecam_ema=lecam_ema.cpu(), embed_prob=embed_prob.cpu(), nonfinite=nonfinite_total, data=data_states,
                        rng=[{k: v if v is None else v.cpu() for k, v in r.items()} for r in rngs])
            torch.save(ckpt, ckpt_path + '.tmp')
            os.replace(ckpt_path + '.tmp', ckpt_path)  # atomic: a kill leaves the old file or the new one, never half
            log(f"saved {ckpt_path} (step {step})")
        if ddp:
            dist.barrier()

    def kl_noise(step, n, gen_seed):
        """(n, N, C) posterior noise for this step's samples, n = the global batch, in global sample order."""
        g = torch.Generator().manual_seed(gen_seed * 1_000_003 + step)
        return torch.randn(n, cfg.num_latent_tokens, cfg.token_size, generator=g).to(device)

    @torch.no_grad()
    def evaluate(step):
        """PSNR of the EMA model on held-out images (8-bit rounded, as saved), a recon grid, VQ codebook usage."""
        psnr, counts, n, grid = [], torch.zeros(cfg.codebook_size, device=device), 0, None
        for batch in eval_loader:
            img = batch['image'][:args.eval_images - n].to(device)
            with ctx:
                guidance = text_encoder(batch['caption'][:len(img)])['guidance']
                noise = None if vq else kl_noise(n, len(img), args.seed + 1)
                recon, aux = ema(img, guidance, sample=False, noise=noise)  # VQ: no noise; KL: drawn per sample
            recon = (recon.float().clamp(0, 1) * 255).round() / 255
            psnr.append(-10 * torch.log10((recon - img).pow(2).mean((1, 2, 3)).clamp_min(1e-10)))
            if vq:
                counts += torch.bincount(aux['ids'].flatten(), minlength=cfg.codebook_size)
            if grid is None:
                grid = make_grid([img[:8], recon[:8]])
            n += len(img)
            if n >= args.eval_images:
                break
        path = os.path.join(args.out_dir, f"recon_{step:07d}.png")
        Image.fromarray(grid).save(path)
        msg = f"eval step {step} | psnr {torch.cat(psnr).mean().item():.2f} dB on {n} held-out images | grid {path}"
        if vq:
            p = counts / counts.sum()
            perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()).item()
            msg += f" | codebook usage {(counts > 0).float().mean().item():.1%} perplexity {perplexity:.1f}"
        log(msg)
        return torch.cat(psnr).mean().item()

    # -------------------------------------------------------------------------
    # training loop
    train_iter = iter(train_loader)
    disc_params = {k: v for k, v in disc_raw.named_buffers()}
    flops, peak = flops_per_image(cfg) * args.batch_size, float('inf')
    if device_type == 'cuda':
        name = torch.cuda.get_device_name()
        peak = 989e12 if ('H100' in name or 'H200' in name) else 312e12 if 'A100' in name else float('inf')
    consecutive_bad, smooth, t0, timed, timed_steps = 0, {}, time.time(), 0.0, 0
    for step in range(start_step, args.max_steps + 1):
        last = step == args.max_steps
        # once in a while: held-out PSNR and a recon grid (rank 0, EMA weights)
        if eval_loader is not None and (last or (step % args.eval_every == 0 and step > start_step) or step == 0):
            evaluate(step)
        if ddp:
            dist.barrier()
        # once in a while: checkpoint (never at the start step: nothing new to save)
        if step > start_step and (last or step % args.ckpt_every == 0):
            save_checkpoint(step)
        if last:
            break

        lr = get_lr(step, args.lr, args.warmup_steps, args.max_steps, args.end_lr)
        for group in opt.param_groups:
            group['lr'] = lr * group['lr_scale']
        gan = 0 <= args.disc_start <= step  # the GAN phase: D trains, G gets the adversarial term, LeCAM is on
        if gan:
            lr_d = get_lr(step - args.disc_start, args.disc_lr, args.warmup_steps, args.max_steps - args.disc_start,
                          args.end_lr * args.disc_lr / args.lr)
            for group in opt_d.param_groups:
                group['lr'] = lr_d
            disc_params.update({k: v.detach() for k, v in disc_raw.named_parameters()})  # frozen copy for G's term
        noise = None if vq else kl_noise(step, args.batch_size, args.seed)
        terms, feats = {}, []
        for micro in range(grad_accum):
            batch = next(train_iter)
            img = batch['image'].to(device, non_blocking=True)
            idx = (micro * mb + torch.arange(len(img))) * world + rank  # this rank's samples' global slots
            if ddp:  # all-reduce the gradients only on the last micro step (nanoGPT's flag; no_sync() does the same)
                model.require_backward_grad_sync = disc.require_backward_grad_sync = micro == grad_accum - 1
            with torch.no_grad(), ctx:
                guidance = text_encoder(batch['caption'])['guidance']  # (B, 77, W) frozen CLIP, on the fly
            with ctx:
                recon, aux = model(img, guidance, noise=None if vq else noise[idx.to(device)])
            recon = recon.float()  # every loss in fp32
            t = dict(recon=F.mse_loss(recon, img))
            loss = t['recon']
            if perceptual is not None:
                with ctx:
                    t['perceptual'] = perceptual(recon, img, args.convnext_weight)
                loss = loss + args.perceptual_weight * t['perceptual']
            if vq:
                t.update(quantizer=aux['quantizer_loss'], commitment=aux['commitment_loss'],
                         codebook=aux['codebook_loss'], usage=aux['usage'], perplexity=aux['perplexity'])
                feats.append((aux['features'], aux['ids'], idx.to(device)))  # (B, N, C), (B, N), (B,) global slots
                loss = loss + args.quantizer_weight * t['quantizer']
            else:
                t['kl'] = aux['kl_loss']
                loss = loss + args.kl_weight * t['kl']
            if gan and args.disc_weight > 0:  # through D with frozen (detached) weights: only the image gets gradient
                with ctx:
                    logits_fake = torch.func.functional_call(disc_raw, disc_params, (recon,))
                t['g_adv'] = -logits_fake.float().mean()  # hinge generator loss, no adaptive weight in the release
                loss = loss + args.disc_weight * t['g_adv']
            t['loss'] = loss
            scaler.scale(loss / grad_accum).backward()
            if gan:
                with ctx:
                    logits = disc(torch.cat([img, recon.detach()])).float()  # (2B, 1, 16, 16)
                real, fake = logits.chunk(2)
                t['d_hinge'] = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
                # LeCAM on each image's mean logit against the EMAs (the release squares the batch mean's hinge;
                # per image keeps the loss a plain mean, so micro batching and world size don't change it)
                real_i, fake_i = real.mean((1, 2, 3)), fake.mean((1, 2, 3))
                t['lecam'] = F.relu(real_i - lecam_ema[1]).pow(2).mean() + F.relu(lecam_ema[0] - fake_i).pow(2).mean()
                t['logits_real'], t['logits_fake'] = real_i.mean(), fake_i.mean()
                scaler_d.scale((t['d_hinge'] + args.lecam_weight * t['lecam']) / grad_accum).backward()
            for k, v in t.items():
                terms[k] = terms.get(k, 0.0) + v.detach().float() / grad_accum
        # every term, averaged over micro steps and ranks
        keys = sorted(terms)
        vals = torch.stack([terms[k] for k in keys])
        if ddp:
            dist.all_reduce(vals)
            vals /= world
        terms = dict(zip(keys, vals))
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        finite = torch.isfinite(terms['loss']) & (torch.isfinite(gnorm) | scaler.is_enabled())
        if gan:
            scaler_d.unscale_(opt_d)
            dnorm = torch.nn.utils.clip_grad_norm_(disc_raw.parameters(), args.grad_clip)
            finite &= torch.isfinite(terms['d_hinge'] + terms['lecam']) & (torch.isfinite(dnorm) | scaler_d.is_enabled())
        if finite.item():  # a sync point, once per step: the skip decision must be the same on every rank
            consecutive_bad = 0
            scaler.step(opt)
            scaler.update()
            if vq and args.cluster_vq:
                f, i, slot = (torch.cat(x) for x in zip(*feats))
                if ddp:  # every rank's features: the anchors are picked from the whole global batch
                    f, i, slot = (torch.cat(gather_tensors(x)) for x in (f, i, slot))
                order = slot.argsort()  # in global sample order, so ties break the same way for any world size
                cluster_codebook(raw_model.quantize.embedding.weight.data, embed_prob, f[order].flatten(0, 1),
                                 i[order].flatten(), l2=cfg.use_l2_norm)
            update_ema(ema, raw_model, min(args.ema_decay, (1 + step) / (10 + step)))  # the release's EMA warm-up
            if gan:
                scaler_d.step(opt_d)
                scaler_d.update()
                lecam_ema.mul_(0.999).add_(torch.stack([terms['logits_real'], terms['logits_fake']]), alpha=0.001)
        else:  # a non-finite loss or gradient: skip the step, count it, stop if it keeps happening
            consecutive_bad += 1
            nonfinite_total += 1
            scaler.update()  # fp16: lowers the loss scale (and closes this step's unscale_); a no-op otherwise
            if gan:
                scaler_d.update()
            log(f"step {step}: non-finite loss or gradient, step skipped "
                f"({consecutive_bad} in a row, {nonfinite_total} in all)")
            if consecutive_bad >= args.max_nonfinite:
                log(f"stopping: {consecutive_bad} non-finite steps in a row (lower --lr, or try --dtype float32); "
                    f"the last good checkpoint is kept in {ckpt_path}")
                if ddp:
                    dist.destroy_process_group()
                sys.exit(1)
        opt.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)

        # logging
        if device_type == 'cuda':
            torch.cuda.synchronize()
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if step - start_step >= 5:  # skip the first steps (compile, warm-up) in the throughput average
            timed, timed_steps = timed + dt, timed_steps + 1
        for k, v in terms.items():  # debiased EMA of each term, for readability (.item(): fine, we synced above)
            smooth[k] = (0.9 * smooth.get(k, (0.0, 0))[0] + 0.1 * v.item(), smooth.get(k, (0.0, 0))[1] + 1)
        if step % args.log_every == 0 or step == args.max_steps - 1:
            c = torch.tensor([train_loader.counts[k] for k in ('read', 'filtered', 'corrupt')], device=device)
            if ddp:
                dist.all_reduce(c)
            avg = timed / timed_steps if timed_steps else dt
            mfu = f" | mfu {100 * flops / avg / (peak * world):.1f}%" if device_type == 'cuda' else ''
            log(f"step {step}/{args.max_steps} | " + ' | '.join(f"{k} {v / (1 - 0.9 ** n):.4g}" for k, (v, n) in smooth.items())
                + f" | gnorm {gnorm.item():.3g}" + (f" | dnorm {dnorm.item():.3g}" if gan else '') +
                f" | lr {lr:.2e} | dt {dt * 1000:.0f}ms | img/s {args.batch_size / avg:.1f}{mfu}"
                f" | data read {c[0]} skipped {c[1] + c[2]} | nonfinite {nonfinite_total}")
            if master:  # the same, raw and machine-readable
                with open(os.path.join(args.out_dir, 'metrics.jsonl'), 'a') as f:
                    row = dict(step=step, lr=lr, gnorm=gnorm.item(), **{k: v.item() for k, v in terms.items()})
                    f.write(json.dumps(row) + '\n')
    if device_type == 'cuda':
        print0(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if ddp:
        dist.destroy_process_group()

if __name__ == '__main__':
    args = get_args()
    try:
        main(args)
    except (CheckpointError, DataError) as e:  # user errors: a short message, exit 2, no traceback
        die(e)
