"""
TA-TiTok: the text-aware 1D image tokenizer, all of it in this single file.

An image becomes N = 32, 64 or 128 tokens, discrete (VQ, 8192 codes) or continuous (KL, 16 channels); a ViT
decoder that also reads the caption's CLIP features turns the tokens back into pixels. The file also holds the
frozen CLIP text encoder with the three views of it that TA-TiTok and MaskGen use, the loading code for the
official releases (shared with maskgen.py), and the few helpers every script shares (device, precision, processes,
checkpoints, the learning-rate schedule and the EMA).

    from tatitok import TATiTok, TextEncoder
    tok = TATiTok.from_pretrained('vq128')      # or a repo id, a local .bin/.safetensors, a ckpt of ours
    clip = TextEncoder.from_open_clip()         # ViT-L-14-336, 'openai' weights
    ids = tok.encode(images)                    # (B, 128) codes, images in [0, 1]
    recon = tok.decode_tokens(ids, clip(captions)['guidance'])

References:
1) the paper: https://arxiv.org/abs/2501.07730
2) the official code: https://github.com/bytedance/1d-tokenizer (modeling/tatitok.py, modeling/titok.py,
   modeling/modules/blocks.py, modeling/quantizer/quantizer.py, utils/lr_schedulers.py)
3) TiTok, the 1D tokenizer it extends: https://arxiv.org/abs/2406.07550
4) open_clip, whose text tower we read: https://github.com/mlfoundations/open_clip
"""
import os
import json
import math
import http.client
import zipfile
import functools
import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# the ViT of the encoder and the decoder (open_clip style, as in the official modeling/modules/blocks.py)

class Attention(nn.Module):
    """nn.MultiheadAttention's math and parameter names (packed q, k, v rows), batch first, through SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's own init, kept by the official code

    def forward(self, x):
        B, T, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3C)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs), flash / memory-efficient kernels on GPU
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))

class MLP(nn.Module):

    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact (erf) GELU, as nn.GELU() in the release

class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

def run_blocks(blocks, x, checkpointing):
    # checkpointing: each block recomputed in the backward pass, one block's activations kept instead of all
    for block in blocks:
        if checkpointing:
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x

# -----------------------------------------------------------------------------
# the encoder: image patches and N learned latent tokens in, the latent tokens' outputs out

class Encoder(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        W = cfg.enc_width
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        out_channels = cfg.token_size * 2 if cfg.quantize == 'kl' else cfg.token_size  # KL: mean and logvar
        self.patch_embed = nn.Conv2d(3, W, cfg.patch_size, stride=cfg.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(1, W))
        self.positional_embedding = nn.Parameter(torch.zeros(n_patches + 1, W))
        self.latent_token_positional_embedding = nn.Parameter(torch.zeros(cfg.num_latent_tokens, W))
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = nn.ModuleList([Block(W, cfg.enc_heads) for _ in range(cfg.enc_layers)])
        self.checkpointing = False
        self.ln_post = nn.LayerNorm(W)
        self.conv_out = nn.Conv2d(W, out_channels, 1)  # a 1x1 conv in the release; a per-token linear in effect

    def forward(self, img, latent_tokens):
        B, N = img.shape[0], latent_tokens.shape[0]
        x = self.patch_embed(img).flatten(2).transpose(1, 2)  # (B, P, W), P = (H/p) * (W/p) patches
        x = torch.cat([self.class_embedding.expand(B, 1, -1), x], dim=1)  # (B, 1+P, W)
        x = x + self.positional_embedding
        z = (latent_tokens + self.latent_token_positional_embedding).expand(B, -1, -1)  # (B, N, W)
        x = self.ln_pre(torch.cat([x, z], dim=1))  # (B, 1+P+N, W): [cls, patches, latents]
        x = run_blocks(self.transformer, x, self.checkpointing)
        x = self.ln_post(x[:, -N:])  # (B, N, W), the latent positions only
        return F.linear(x, self.conv_out.weight.flatten(1), self.conv_out.bias)  # (B, N, C_out), token-major

# -----------------------------------------------------------------------------
# the two bottlenecks

def at_least_fp32(x):
    """x in fp32 where autocast made it half precision; a float64 model (the tokenizer's
    training-step parity test) stays float64, as the fixtures patched the official `.float()` to."""
    return x.to(torch.promote_types(x.dtype, torch.float32))

class VectorQuantizer(nn.Module):
    """Nearest-code VQ with a straight-through estimator (official modeling/quantizer/quantizer.py)."""

    def __init__(self, codebook_size, token_size, commitment_cost=0.25, use_l2_norm=False):
        super().__init__()
        self.commitment_cost = commitment_cost
        self.use_l2_norm = use_l2_norm  # the release's option, off in its tokenizers: features and codes on the sphere
        self.embedding = nn.Embedding(codebook_size, token_size)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)

    def codes(self):
        """(K, C) the code vectors the decoder reads."""
        if self.use_l2_norm:
            return F.normalize(self.embedding.weight, dim=-1)
        return self.embedding.weight

    @torch.autocast('cuda', enabled=False)
    def forward(self, z):
        z = features = at_least_fp32(z)  # (B, N, C); distances in fp32: bf16 would tie near codes
        if self.use_l2_norm:
            z = F.normalize(z, dim=-1)
        e = self.codes()  # (K, C)
        d = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * z @ e.t()  # (B, N, K) squared L2
        ids = d.argmin(-1)  # (B, N)
        z_q = F.embedding(ids, e)  # (B, N, C)
        commitment = self.commitment_cost * F.mse_loss(z, z_q.detach())  # pulls the encoder to its code
        codebook = F.mse_loss(z_q, z.detach())  # pulls the code to the encoder output
        z_q = z + (z_q - z).detach()  # straight-through: forward is z_q, gradient flows to z
        ones = z.new_ones(ids.numel())
        counts = z.new_zeros(e.shape[0]).index_add_(0, ids.flatten(), ones)  # code usage; no sync
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())  # e^entropy: how many codes are used
        aux = dict(quantizer_loss=commitment + codebook, commitment_loss=commitment, codebook_loss=codebook,
                   ids=ids, perplexity=perplexity, usage=(counts > 0).float().mean(),
                   features=features.detach())  # the encoder's output, for the training-time codebook clustering
        return z_q, aux

class DiagonalGaussian:
    """The KL ('vae') bottleneck: the encoder's 2C channels are a mean and a log-variance per token channel."""

    def __init__(self, params):
        self.mean, logvar = at_least_fp32(params).chunk(2, dim=-1)  # (B, N, C) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None, noise=None):
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device)
        return self.mean + self.std * noise

    def kl(self):
        # KL(q || N(0, I)) summed over tokens and channels, one value per image (the loss averages it over the batch)
        return 0.5 * (self.mean.pow(2) + self.std.pow(2) - 1.0 - self.logvar).sum(dim=(1, 2))  # (B,)

# -----------------------------------------------------------------------------
# the text-aware decoder: [cls, image queries, N latent tokens, 77 text tokens] in, pixels in [0, 1] out

class Unpatchify(nn.Module):
    """(B, p*p*3, h, w) -> (B, 3, h*p, w*p) with channels ordered (p1, p2, c): einops' 'b (p1 p2 c) h w ->
    b c (h p1) (w p2)' of the release. nn.PixelShuffle orders them (c, p1, p2), so it would scramble the weights."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        B, _, h, w = x.shape
        x = x.view(B, self.p, self.p, 3, h, w)  # (B, p1, p2, c, h, w)
        return x.permute(0, 3, 4, 1, 5, 2).reshape(B, 3, h * self.p, w * self.p)  # (B, c, h, p1, w, p2)

class Decoder(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        W = cfg.dec_width
        self.grid = cfg.image_size // cfg.patch_size
        self.decoder_embed = nn.Linear(cfg.token_size, W)
        self.class_embedding = nn.Parameter(torch.zeros(1, W))
        self.positional_embedding = nn.Parameter(torch.zeros(self.grid ** 2 + 1, W))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, W))  # the image query, one per patch
        self.latent_token_positional_embedding = nn.Parameter(torch.zeros(cfg.num_latent_tokens, W))
        self.text_guidance_proj = nn.Linear(cfg.text_embed_dim, W)
        self.text_guidance_positional_embedding = nn.Parameter(torch.zeros(cfg.text_context_length, W))
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = nn.ModuleList([Block(W, cfg.dec_heads) for _ in range(cfg.dec_layers)])
        self.checkpointing = False
        self.ln_post = nn.LayerNorm(W)
        self.ffn = nn.Sequential(nn.Conv2d(W, cfg.patch_size ** 2 * 3, 1), Unpatchify(cfg.patch_size))
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, z, text_guidance):
        B, N, _ = z.shape
        P = self.grid ** 2
        z = self.decoder_embed(z) + self.latent_token_positional_embedding[:N]  # (B, N, W)
        q = torch.cat([self.class_embedding.expand(B, 1, -1), self.mask_token.expand(B, P, -1)], dim=1)
        q = q + self.positional_embedding  # (B, 1+P, W)
        t = self.text_guidance_proj(text_guidance) + self.text_guidance_positional_embedding  # (B, 77, W)
        x = self.ln_pre(torch.cat([q, z, t], dim=1))  # (B, 1+P+N+77, W)
        x = run_blocks(self.transformer, x, self.checkpointing)
        x = self.ln_post(x[:, 1:1 + P])  # (B, P, W), the image queries
        x = x.transpose(1, 2).reshape(B, -1, self.grid, self.grid)  # (B, W, h, w)
        return self.conv_out(self.ffn(x))  # (B, 3, H, W), [0, 1] domain, not clamped

# -----------------------------------------------------------------------------
# the tokenizer

@dataclass
class TATiTokConfig:
    image_size: int = 256
    patch_size: int = 16
    num_latent_tokens: int = 32   # N, the length of the 1D token sequence
    quantize: str = 'vq'          # 'vq' (discrete codes) or 'kl' (continuous Gaussian tokens, 'vae' in the release)
    token_size: int = 64          # C, channels per token: 64 for VQ, 16 for KL
    codebook_size: int = 8192     # VQ only
    enc_width: int = 768          # ViT-B encoder ('bl' releases); 512 for ViT-S ('sl')
    enc_layers: int = 12
    enc_heads: int = 12
    dec_width: int = 1024         # ViT-L decoder in every release
    dec_layers: int = 24
    dec_heads: int = 16
    text_embed_dim: int = 768     # width of the CLIP text tower (ViT-L-14-336: 768)
    text_context_length: int = 77
    commitment_cost: float = 0.25
    use_l2_norm: bool = False     # VQ: quantize on the unit sphere (the release's option, off in every release)

class TATiTok(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.quantize in ('vq', 'kl'), config.quantize
        assert config.image_size % config.patch_size == 0
        self.config = config
        self.latent_tokens = nn.Parameter(torch.zeros(config.num_latent_tokens, config.enc_width))
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.quantize == 'vq':
            self.quantize = VectorQuantizer(config.codebook_size, config.token_size, config.commitment_cost,
                                            config.use_l2_norm)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Training init, as the release:
        | parameter                                          | init                                   |
        | cls / position / latent embeddings, mask token     | randn * width^-0.5                     |
        | encoder Linear and Conv weights                    | trunc_normal(std 0.02), bias 0         |
        | decoder Linear and Conv weights                    | torch defaults (kaiming uniform)       |
        | LayerNorm                                          | weight 1, bias 0                       |
        | attention in_proj (packed q, k, v)                 | xavier_uniform (nn.MultiheadAttention) |
        | codebook                                           | uniform(+-1/K)                         |
        The release runs TiTok._init_weights before it swaps in the text-aware decoder, so the decoder keeps torch's
        default init. That matters: with std 0.02 in the decoder's two output convs as well, their product starves
        the decoder of gradient and training sits on the mean image for hundreds of steps."""
        if self.latent_tokens.device.type == 'meta':
            return
        for m in self.encoder.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith(('class_embedding', 'positional_embedding', 'latent_tokens', 'mask_token')):
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, img, text_guidance, sample=True, noise=None):
        """img (B, 3, H, W) in [0, 1], text_guidance (B, 77, T) -> (reconstruction, aux dict of loss terms).
        KL: the posterior is sampled (sample=True), or its mean taken; noise (B, N, C) replaces the drawn noise, so
        that train_tokenizer.py can draw it per global sample and any number of processes trains the same model."""
        z = self.encoder(img, self.latent_tokens)  # (B, N, C), or (B, N, 2C) for KL
        if self.config.quantize == 'vq':
            z, aux = self.quantize(z)
        else:
            posterior = DiagonalGaussian(z)
            z = posterior.mean
            if sample:
                z = posterior.sample(noise=noise)
            aux = dict(kl_loss=posterior.kl().mean())
        return self.decoder(z, text_guidance), aux

    @torch.no_grad()
    def encode(self, img, sample=True, generator=None):
        """Tokens of img: VQ code ids (B, N); KL latents (B, N, C), a posterior sample as in the release, or
        its mean with sample=False."""
        z = self.encoder(img, self.latent_tokens)
        if self.config.quantize == 'vq':
            return self.quantize(z)[1]['ids']
        posterior = DiagonalGaussian(z)
        if sample:
            return posterior.sample(generator)
        return posterior.mean

    @torch.no_grad()
    def encode_posterior(self, img):
        """KL only: the posterior's (mean, logvar), each (B, N, C), e.g. for pretokenizing a data set."""
        assert self.config.quantize == 'kl'
        posterior = DiagonalGaussian(self.encoder(img, self.latent_tokens))
        return posterior.mean, posterior.logvar

    def decode_tokens(self, tokens, text_guidance):
        """VQ ids (B, N) or KL latents (B, N, C), with text guidance (B, 77, T) -> images (B, 3, H, W), unclamped."""
        if self.config.quantize == 'vq':
            tokens = F.embedding(tokens, self.quantize.codes())  # (B, N, C); the release's (B, 1, N) is squeezed
        return self.decoder(tokens, text_guidance)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32, **overrides):
        """A preset name ('vq128', 'kl32', ...), the Hugging Face repo id of an official release, a
        local .bin / .safetensors file in the official key layout (its sizes read off the tensors),
        a checkpoint (or its folder) written by train_tokenizer.py, or such a checkpoint's dict in
        memory (a generator checkpoint embeds its tokenizer that way); its weights in `dtype`.
        Returns the model in eval mode. See load_tatitok at the end of the file."""
        return load_tatitok(name_or_path, dtype, **overrides)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type='cpu', encoder_lr_scale=1.0):
        """AdamW with the release's no-decay rules; the encoder and the latent tokens can train at a share of the
        learning rate (1 in the release): each group's `lr_scale` multiplies the schedule's value."""
        encoder = [(n, p) for n, p in self.named_parameters() if n.startswith(('encoder.', 'latent_tokens'))]
        rest = [(n, p) for n, p in self.named_parameters() if not n.startswith(('encoder.', 'latent_tokens'))]
        groups = [dict(g, lr_scale=encoder_lr_scale) for g in param_groups(encoder, weight_decay)]
        groups += [dict(g, lr_scale=1.0) for g in param_groups(rest, weight_decay)]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ('cuda', 'cpu'))

    def activation_bytes(self):
        """The memory plan's bytes of a training step under 16-bit autocast (as MaskGen's): a block keeps
        36 bytes per token and width unit (fp32 LayerNorm inputs, 16-bit q, k, v, attention output and
        matmul inputs, the MLP's hidden state and GELU's input) and the attention's log-sum-exp; the rest
        (patches, norms, projections, the output convs) is small at the releases' sizes."""
        cfg = self.config
        P, N, We, Wd = (cfg.image_size // cfg.patch_size) ** 2, cfg.num_latent_tokens, cfg.enc_width, cfg.dec_width
        Te, Td = 1 + P + N, 1 + P + N + cfg.text_context_length
        enc = 36 * Te * We + 4 * cfg.enc_heads * Te
        dec = 36 * Td * Wd + 4 * cfg.dec_heads * Td
        rest = 4 * (Te * We + Td * Wd) + 10 * P * Wd + 20 * cfg.image_size ** 2
        rest += 2 * cfg.text_context_length * cfg.text_embed_dim
        inputs = 4 * (cfg.enc_layers * Te * We + cfg.dec_layers * Td * Wd)
        return dict(saved=cfg.enc_layers * enc + cfg.dec_layers * dec + rest,
                    checkpointed=inputs + max(enc, dec) + rest, casts=2 * self.get_num_params(), transient=0)

    def estimate_flops(self, encode=True, decode=True):
        """FLOPs per image (2 per multiply-add of a matmul or conv), counted from the architecture; checked against
        torch's FlopCounterMode in the tests. The VQ distances count; the decoder's text projection too."""
        cfg = self.config
        P = (cfg.image_size // cfg.patch_size) ** 2
        N, p = cfg.num_latent_tokens, cfg.patch_size
        vit = lambda W, L, S: L * (12 * W * W * S + 2 * S * S * W)  # q, k, v, out + MLP, then attention
        macs = 0
        if encode:  # patch embedding, the ViT over [cls, patches, latents], conv_out on the latents
            c_out = cfg.token_size * 2 if cfg.quantize == 'kl' else cfg.token_size
            macs += P * 3 * p * p * cfg.enc_width + vit(cfg.enc_width, cfg.enc_layers, 1 + P + N)
            macs += N * cfg.enc_width * c_out
            if cfg.quantize == 'vq':
                macs += N * cfg.codebook_size * cfg.token_size  # the nearest-code distances
        if decode:  # token and text projections, the ViT over [cls, queries, latents, text], the output convs
            W, T = cfg.dec_width, cfg.text_context_length
            macs += N * cfg.token_size * W + T * cfg.text_embed_dim * W
            macs += vit(W, cfg.dec_layers, 1 + P + N + T)
            macs += P * W * 3 * p * p + cfg.image_size ** 2 * 3 * 3 * 9
        return 2 * macs

# -----------------------------------------------------------------------------
# the frozen CLIP text encoder and its three views

def clip_ids(tokenizer, caption, context_length=77):
    """(77,) int64 CLIP token ids of one caption, from open_clip's tokenizer: made in the data workers for
    training. A caption longer than the context is truncated with a warning, never an error."""
    with torch.device('cpu'):  # whatever the default device (e.g. meta for counting)
        ids = tokenizer([caption], context_length=context_length)[0].numpy()  # (77,)
    if ids[-1] != 0 and len(tokenizer.encode(caption)) > context_length - 2:  # minus SOT, EOT
        warnings.warn(f"a caption longer than {context_length} CLIP tokens was truncated: "
                      f"{caption[:60]!r}...")
    return ids

def text_tower(text_cfg, embed_dim, quick_gelu=False, weights=None, seed=0, dtype=torch.float32):
    """open_clip's CLIP text tower, built alone (the vision tower is most of a CLIP model), with the
    weights of `weights` (a file of the tower or of the whole model), or random ones from `seed`."""
    from open_clip.model import _build_text_tower, _build_vision_tower
    if weights:
        with torch.device('meta'):  # no weight drawn only to be replaced by the file's
            tower = _build_text_tower(embed_dim, text_cfg, quick_gelu).to(dtype)
        # mapped even for another dtype: reading the file to cast it would read the vision tower too
        sd = {k: v for k, v in load_state_dict_file(weights).items() if not k.startswith('visual.')}
        load_official(tower, sd, weights, ignore=('logit_scale', 'logit_bias'))  # CLIP's, unused
        if tower.attn_mask is not None:  # the causal mask is in no file: built again, off meta
            tower.attn_mask = tower.build_causal_mask()
        return tower
    rng = torch.get_rng_state()
    torch.manual_seed(seed)  # the same seed gives the same tower, so a checkpoint can rebuild it
    # open_clip's CLIP(...) draws a vision tower before the text tower, and our checkpoints' seeds
    # were drawn that way: draw a tiny one and drop it, so that each seed gives the same text tower
    _build_vision_tower(embed_dim, dict(layers=1, width=64, patch_size=8, image_size=16))
    tower = _build_text_tower(embed_dim, text_cfg, quick_gelu)
    torch.set_rng_state(rng)
    return tower.to(dtype)

RELEASE_CLIP = dict(model='ViT-L-14-336', pretrained='openai')  # the releases' text encoder

class TextEncoder(nn.Module):
    """A frozen open_clip text tower. One pass gives the three views the official code takes from it:
    guidance: ln_final of the last block, all 77 positions (the TA-TiTok decoder's text input)
    tokens:   the output of the penultimate block, no ln_final (the MaskGen context stream)
    pooled:   ln_final at the end-of-text token @ text_projection (the MaskGen pooled condition)"""

    def __init__(self, clip, tokenizer, spec):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.spec = spec  # how to rebuild it (kept in checkpoints)
        self.width = clip.token_embedding.weight.shape[1]
        self.embed_dim = clip.text_projection.shape[-1]
        self.context_length = clip.positional_embedding.shape[0]
        # CLIP's text cleaning and BPE run in Python, a tenth of a quickstart step: cache each caption's ids
        # (integers, so no number changes), per instance and bounded for web-scale data
        self._ids = functools.lru_cache(maxsize=1 << 16)(self._ids)
        self.requires_grad_(False).eval()

    @classmethod
    def from_name(cls, name, context_length=77, dtype=torch.float32):
        """--clip of every script: 'tiny' (random weights, built here, `context_length` positions), MODEL:PRETRAINED
        of open_clip (PRETRAINED: a tag, downloaded once, or a local file), MODEL alone ('openai' weights), or a
        local file of the releases' text encoder, ViT-L-14-336. Its weights in `dtype`."""
        if name == 'tiny':
            return cls.tiny(context_length=context_length).to(dtype)
        model, _, pretrained = name.partition(':')
        if not pretrained and os.path.isfile(name):
            return cls.from_open_clip('ViT-L-14-336', name, dtype)
        return cls.from_open_clip(model, pretrained or 'openai', dtype)

    @classmethod
    def from_spec(cls, spec, dtype=torch.float32):
        """Rebuild from self.spec (kept in checkpoints): an open_clip model and tag, or a text_cfg."""
        if 'text_cfg' in spec:
            return cls.from_text_cfg(**spec, dtype=dtype)
        return cls.from_open_clip(**spec, dtype=dtype)

    @classmethod
    def from_open_clip(cls, model='ViT-L-14-336', pretrained='openai', dtype=torch.float32):
        """The text tower of any open_clip CLIP model, built alone from open_clip's config of it.
        pretrained: an open_clip tag (downloaded, cached) or a local file of the model or tower."""
        import open_clip  # imported here: only building the text encoder needs it
        if model not in open_clip.list_models():
            raise UserError(f"--clip {model}:{pretrained}: open_clip has no model {model!r}")
        cfg = open_clip.get_model_config(model)
        path, quick_gelu = pretrained, cfg.get('quick_gelu', False)
        if not os.path.isfile(pretrained):
            tag = open_clip.pretrained.get_pretrained_cfg(model, pretrained)
            if not tag.get('hf_hub'):
                raise UserError(f"open_clip has no pretrained {pretrained!r} for {model!r}; pass a local file")
            repo, filename = os.path.split(tag['hf_hub'])
            candidates = [filename] if filename else ['open_clip_model.safetensors', 'open_clip_pytorch_model.bin']
            path = hf_download(repo, candidates)
            # the OpenAI weights were trained with QuickGELU
            quick_gelu = quick_gelu or tag.get('quick_gelu', False)
        tower = text_tower(cfg['text_cfg'], cfg['embed_dim'], quick_gelu, weights=path, dtype=dtype)
        return cls(tower, open_clip.get_tokenizer(model), dict(model=model, pretrained=pretrained))

    @classmethod
    def from_text_cfg(cls, text_cfg, embed_dim, weights=None, seed=0, tokenizer='ViT-L-14-336',
                      dtype=torch.float32):
        """A CLIP text tower of any size (open_clip's text_cfg): random weights drawn from `seed`, or loaded from
        `weights`, a file of an open_clip text tower or of a whole CLIP model."""
        import open_clip
        tower = text_tower(text_cfg, embed_dim, weights=weights, seed=seed, dtype=dtype)
        spec = dict(text_cfg=text_cfg, embed_dim=embed_dim, weights=weights, seed=seed, tokenizer=tokenizer)
        return cls(tower, open_clip.get_tokenizer(tokenizer), spec)

    @classmethod
    def tiny(cls, seed=0, context_length=77):
        """A small text tower with random weights, built locally: for tests and the offline quickstart. Random
        features still tell captions apart, which is all a model trained on them needs. The shapes presets use 16
        positions (their longest caption is 14 CLIP tokens): 77 would be most of the decoder's sequence."""
        text_cfg = dict(context_length=context_length, vocab_size=49408, width=64, heads=4, layers=4)
        return cls.from_text_cfg(text_cfg, 64, seed=seed)

    def tokenize(self, captions):
        """(B, 77) token ids. Captions longer than the context are truncated (with a warning), never an error."""
        return torch.stack([self._ids(c) for c in captions])  # (B, 77)

    def _ids(self, caption):
        """(77,) token ids of one caption (cached per caption in __init__)."""
        return torch.from_numpy(clip_ids(self.tokenizer, caption, self.context_length))

    @torch.no_grad()
    def forward(self, captions):
        """captions: list of str, or (B, 77) token ids -> dict(guidance, tokens, pooled)."""
        device = self.clip.token_embedding.weight.device
        ids = captions if torch.is_tensor(captions) else self.tokenize(captions)
        ids = ids.to(device)  # (B, 77)
        x = self.clip.token_embedding(ids) + self.clip.positional_embedding  # (B, 77, W)
        batch_first = getattr(self.clip.transformer, 'batch_first', True)  # open_clip < 2.23 runs blocks (L, B, W)
        if not batch_first:
            x = x.transpose(0, 1)
        blocks = self.clip.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x, attn_mask=self.clip.attn_mask)  # causal, as CLIP was trained
        penultimate = x
        x = blocks[-1](x, attn_mask=self.clip.attn_mask)
        if not batch_first:
            x, penultimate = x.transpose(0, 1), penultimate.transpose(0, 1)
        guidance = self.clip.ln_final(x)  # (B, 77, W)
        eot = guidance[torch.arange(ids.shape[0], device=device), ids.argmax(dim=-1)]  # (B, W) EOT has the top id
        pooled = eot @ self.clip.text_projection  # (B, E), not normalised
        return dict(guidance=guidance, tokens=penultimate, pooled=pooled)

    def estimate_flops(self):
        """FLOPs per caption: all 77 positions through every block (the causal mask does not shrink the matmuls),
        then the end-of-text projection."""
        W, S = self.width, self.context_length
        L = len(self.clip.transformer.resblocks)
        return 2 * (L * (12 * W * W * S + 2 * S * S * W) + W * self.embed_dim)

# -----------------------------------------------------------------------------
# presets: the six official releases (repo ids from the official README), plus small ones for CPU

_B = dict(enc_width=768, enc_layers=12, enc_heads=12)
_S = dict(enc_width=512, enc_layers=8, enc_heads=8)
_L = dict(dec_width=1024, dec_layers=24, dec_heads=16)
_HF = 'turkeyju/tokenizer_tatitok_'
# text_embed_dim 64 = TextEncoder.tiny()'s width
_TINY = dict(image_size=32, patch_size=8, num_latent_tokens=8, enc_width=64, enc_layers=2, enc_heads=4,
             dec_width=64, dec_layers=2, dec_heads=4, text_embed_dim=64)
# the CPU quickstart's: 32 px in 4 px patches, 32 tokens, 16 text positions, one encoder and three decoder layers
# 64 wide (rendering is the slow part); TUNING.md says how each number was chosen
_SHAPES = dict(image_size=32, patch_size=4, num_latent_tokens=32, enc_width=64, enc_layers=1, enc_heads=2,
               dec_width=64, dec_layers=3, dec_heads=2, text_embed_dim=64, text_context_length=16)
TATITOK_PRESETS = {
    'vq32':  dict(quantize='vq', token_size=64, num_latent_tokens=32, **_B, **_L, repo=_HF + 'bl32_vq'),    # 390.8M
    'vq64':  dict(quantize='vq', token_size=64, num_latent_tokens=64, **_B, **_L, repo=_HF + 'bl64_vq'),    # 390.9M
    'vq128': dict(quantize='vq', token_size=64, num_latent_tokens=128, **_B, **_L, repo=_HF + 'bl128_vq'),  # 391.1M
    'kl32':  dict(quantize='kl', token_size=16, num_latent_tokens=32, **_B, **_L, repo=_HF + 'bl32_vae'),   # 390.2M
    'kl64':  dict(quantize='kl', token_size=16, num_latent_tokens=64, **_B, **_L, repo=_HF + 'bl64_vae'),   # 390.3M
    'kl128': dict(quantize='kl', token_size=16, num_latent_tokens=128, **_S, **_L, repo=_HF + 'sl128_vae'), # 330.3M
    'tiny-vq': dict(quantize='vq', token_size=12, codebook_size=96, **_TINY),
    'tiny-kl': dict(quantize='kl', token_size=5, **_TINY),
    # VQ on the unit sphere, no commitment loss (the release's is 0.25): see TUNING.md
    'shapes-vq': dict(quantize='vq', token_size=16, codebook_size=1024, use_l2_norm=True, commitment_cost=0.0,
                      **_SHAPES),
    'shapes-kl': dict(quantize='kl', token_size=16, **_SHAPES),
}

def preset_config(presets, config_class, name, **overrides):
    """config_class of presets[name], with any field overridden; keys it has no field for (a
    release's repo, the generator's tokenizer) stay out."""
    if name not in presets:
        raise UserError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
    known = {f.name for f in fields(config_class)}
    args = {**presets[name], **overrides}
    return config_class(**{k: v for k, v in args.items() if k in known})

def tatitok_config(name, **overrides):
    return preset_config(TATITOK_PRESETS, TATiTokConfig, name, **overrides)

# -----------------------------------------------------------------------------
# loading official weights and our checkpoints (shared with maskgen.py)

class UserError(Exception):
    """A mistake of the user's (a flag's value, a path, a file, a missing download): every script prints it
    in one line and exits 2 (runtime.run_main)."""

    def __init__(self, message):
        super().__init__(' '.join(str(message).split()))  # one line, whatever it quotes

class DownloadError(UserError):
    """A release's file neither in the Hugging Face cache nor downloadable (offline?)."""

SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16,
                      'BF16': torch.bfloat16, 'I64': torch.int64, 'I32': torch.int32,
                      'U8': torch.uint8, 'BOOL': torch.bool}

def read_safetensors(path, dtype):
    """A .safetensors file's tensors read one at a time, the floating-point ones cast to `dtype`.
    Mapped instead, every float32 page read for the cast would stay in memory beside the copies."""
    with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')  # the format: header length, JSON header, bytes
        header = json.loads(f.read(n))
        header.pop('__metadata__', None)
        # one buffer for every read: a new one per tensor would leave the allocator's heap in pieces
        buf = torch.empty(max(h['data_offsets'][1] - h['data_offsets'][0] for h in header.values()),
                          dtype=torch.uint8)
        sd = {}
        for k, h in header.items():
            start, end = h['data_offsets']
            f.seek(8 + n + start)
            if f.readinto(buf[:end - start].numpy()) != end - start:
                raise ValueError(f"the file ends inside {k}")
            x = buf[:end - start].view(SAFETENSORS_DTYPES[h['dtype']]).view(h['shape'])
            sd[k] = x.to(dtype, copy=True) if x.is_floating_point() else x.clone()
    return sd

def load_state_dict_file(path, dtype=torch.float32):
    """A state dict from a .bin/.pt/.pth (torch.save) or .safetensors file, memory-mapped: a
    tensor's bytes stay in the file until read, and a model that takes the tensors themselves
    (load_official) holds its weights once. For weights in another dtype than the releases'
    float32, a .safetensors file is read and cast instead (read_safetensors)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        if path.endswith('.safetensors') and dtype != torch.float32:
            sd = read_safetensors(path, dtype)
        elif path.endswith('.safetensors'):
            from safetensors.torch import load_file  # arrives with open_clip_torch; maps the file
            sd = load_file(path)
        else:  # torch.save's zip format (torch >= 1.6) can be mapped; an older file is read whole
            mapped = zipfile.is_zipfile(path)
            sd = torch.load(path, map_location='cpu', weights_only=True, mmap=mapped)
    except Exception as e:  # truncated, corrupt, or not a checkpoint at all
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    return sd

def reachable(host, timeout=3.0):
    # a dead network makes download libraries retry for ~25 s; a 3 s connection lets us fail fast and clearly
    try:
        http.client.HTTPSConnection(host, timeout=timeout).connect()
        return True
    except OSError:
        return False

def hf_download(repo_id, filenames):
    """Path of the first of `filenames` in the Hugging Face repo, from the local cache or downloaded into it."""
    from huggingface_hub import hf_hub_download, constants  # imported here: only official weights need it
    for name in filenames:
        try:
            return hf_hub_download(repo_id, name, local_files_only=True)
        except Exception:
            pass
    online = not constants.HF_HUB_OFFLINE and reachable(constants.ENDPOINT.split('://')[-1].split('/')[0])
    for name in filenames if online else []:
        try:
            return hf_hub_download(repo_id, name)
        except Exception:
            pass
    raise DownloadError(
        f"cannot get {' or '.join(filenames)} from the Hugging Face repo {repo_id}: not in the local cache and the "
        f"download failed (offline?). Download it on a machine with internet, or pass a local file instead "
        f"(a path to the .bin / .safetensors file, or a checkpoint trained here).")

def load_official(model, sd, source, ignore=(), optional=(), rename=()):
    """Put state dict `sd` (official key layout) into `model`, checking every key and shape; strict,
    never silent. The tensors of `sd` become the model's parameters (cast to its dtype where they
    differ): a model built on the meta device from a memory-mapped file holds each weight once.
    ignore: keys dropped if present (training-only buffers); optional: keys that may be missing (a
    tied weight, which the model ties again once loaded); rename: (official, our) prefix rules."""
    sd = {k: v for k, v in sd.items() if k not in ignore}
    for old, new in rename:
        sd = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}
    ours = model.state_dict()
    missing = [k for k in ours if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in ours]
    if missing or unexpected:
        raise UserError(f"{source}: keys do not match the {type(model).__name__} architecture (missing "
                              f"{len(missing)}: {missing[:5]}, unexpected {len(unexpected)}: {unexpected[:5]})")
    wrong = [f"{k} {tuple(sd[k].shape)} vs ours {tuple(ours[k].shape)}" for k in sd if sd[k].shape != ours[k].shape]
    if wrong:
        raise UserError(f"{source}: {len(wrong)} tensors have the wrong shape, e.g. {wrong[:3]}")
    sd = {k: v.to(ours[k].dtype) for k, v in sd.items()}  # a no-op where the dtypes agree
    for k in optional:  # a tied weight missing from the file: a placeholder, tied again once loaded
        if k not in sd and k in ours:
            sd[k] = ours[k]
    model.load_state_dict(sd, strict=True, assign=True)  # assign: the tensors themselves, no copy
    return model

def read_weights(name_or_path, presets, dtype=torch.float32):
    """What a release's name or repo id, a weights file, a run folder (its ckpt.pt) or a checkpoint's
    dict already in memory holds -> (where it came from, the dict): a state dict in the official layout,
    or a checkpoint of ours ('model_args', 'model', 'ema', ...). A release comes from the Hugging Face
    cache, downloaded into it once. The one way every script turns a name into weights; what it
    returns may be passed again."""
    if isinstance(name_or_path, tuple):  # read already
        return name_or_path
    if isinstance(name_or_path, dict):
        return 'the embedded checkpoint', name_or_path
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    releases = {p['repo']: n for n, p in presets.items() if 'repo' in p}
    name = releases.get(path, path)
    if name in releases.values():
        path = hf_download(presets[name]['repo'], ['model.safetensors', 'pytorch_model.bin'])
    elif not os.path.exists(path):
        raise UserError(f"{name_or_path}: no such file, no ckpt.pt in it, and no release of that name "
                        f"({', '.join(sorted(releases.values()))})")
    return path, load_state_dict_file(path, dtype)

def load_tatitok(name_or_path, dtype=torch.float32, **overrides):
    """TATiTok.from_pretrained: the weights and config of what read_weights finds."""
    path, sd = read_weights(name_or_path, TATITOK_PRESETS, dtype)
    if 'model_args' in sd:  # a checkpoint of ours: its config and weights (EMA when present)
        if 'num_latent_tokens' not in sd['model_args']:
            raise UserError(f"{path}: a generator's checkpoint, not a tokenizer's")
        config = TATiTokConfig(**{**sd['model_args'], **overrides})
        sd = checkpoint_weights(sd)
    else:  # a bare state dict in the official layout carries no config: read it off the shapes
        config = TATiTokConfig(**{**config_from_state_dict(sd, path), **overrides})
    with torch.device('meta'):  # no weights drawn only to be replaced by the file's
        model = TATiTok(config).to(dtype)
    print(f"loading TA-TiTok from {path} ({model.get_num_params() / 1e6:.2f}M parameters)")
    # quantize.embed_prob: usage EMA of the training-time clustering VQ, present in some releases, unused here
    return load_official(model, sd, path, ignore=('quantize.embed_prob',)).eval()

def load_tokenizer(name_or_path, clip=None, dtype=torch.float32):
    """A tokenizer and the text encoder its decoder reads: --clip's if given, else the one its checkpoint
    names, else the releases' CLIP -> (tokenizer, text encoder, what read_weights read)."""
    read = read_weights(name_or_path, TATITOK_PRESETS, dtype)
    tok = load_tatitok(read, dtype)
    cfg = tok.config
    if clip:
        te = TextEncoder.from_name(clip, cfg.text_context_length, dtype)
    else:
        te = TextEncoder.from_spec(read[1].get('text_encoder') or RELEASE_CLIP, dtype)
    if (te.context_length, te.width) != (cfg.text_context_length, cfg.text_embed_dim):
        raise UserError(f"the tokenizer's decoder reads {cfg.text_context_length} x {cfg.text_embed_dim} text "
                        f"features, this text encoder gives {te.context_length} x {te.width}: pass its --clip")
    return tok, te, read

def config_from_state_dict(sd, path):
    """TATiTokConfig fields of an official state dict, from its shapes. Heads are not in the shapes: every release
    uses 64 channels per head, so width // 64 (pass enc_heads / dec_heads to override)."""
    depth = lambda prefix: len({k.split('.')[2] for k in sd if k.startswith(prefix + '.transformer.')})
    try:
        N, enc_width = sd['latent_tokens'].shape
        dec_width, text_embed_dim = sd['decoder.text_guidance_proj.weight'].shape
        patch_size = sd['encoder.patch_embed.weight'].shape[-1]
        grid = math.isqrt(sd['encoder.positional_embedding'].shape[0] - 1)
        vq = 'quantize.embedding.weight' in sd
        codebook_size = sd['quantize.embedding.weight'].shape[0] if vq else 8192
        return dict(image_size=grid * patch_size, patch_size=patch_size, num_latent_tokens=N,
                    quantize='vq' if vq else 'kl', token_size=sd['decoder.decoder_embed.weight'].shape[1],
                    codebook_size=codebook_size, enc_width=enc_width, enc_layers=depth('encoder'),
                    enc_heads=enc_width // 64, dec_width=dec_width, dec_layers=depth('decoder'),
                    dec_heads=dec_width // 64, text_embed_dim=text_embed_dim,
                    text_context_length=sd['decoder.text_guidance_positional_embedding'].shape[0])
    except (KeyError, ValueError, AttributeError):
        raise UserError(f"{path}: not a TA-TiTok state dict (expected keys like 'latent_tokens', "
                              f"'encoder.patch_embed.weight', 'decoder.text_guidance_proj.weight')") from None

def checkpoint_weights(ckpt):
    """The weights a checkpoint of ours is used with: the EMA weights when it has them (as DiT), else the model's."""
    if ckpt.get('ema') is not None:
        return ckpt['ema']
    return ckpt['model']

def param_groups(named_parameters, weight_decay):
    """The release's AdamW groups (utils/train_utils.py): no decay for vectors, and for every name holding one of
    these words (so the adaLN linears, whose names hold 'norm', and anything *embed* go undecayed)."""
    keys = ('ln', 'bias', 'latent_tokens', 'mask_token', 'embedding', 'norm', 'gamma', 'embed')
    decay, no_decay = [], []
    for n, p in named_parameters:
        if p.ndim < 2 or any(key in n for key in keys):
            no_decay.append(p)
        else:
            decay.append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
