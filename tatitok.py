"""
TA-TiTok, the text-aware 1D image tokenizer, all of it in this single file: an image becomes
N = 32-128 VQ codes or KL latents, and a ViT decoder that also reads the caption's CLIP features
turns them back into pixels. Then the frozen CLIP text encoder, the presets, and loading weights.

References:
1) the paper: https://arxiv.org/abs/2501.07730
2) the official code: https://github.com/bytedance/1d-tokenizer (modeling/tatitok.py, titok.py)
3) TiTok, the 1D tokenizer it extends: https://arxiv.org/abs/2406.07550
4) open_clip, whose text tower we read: https://github.com/mlfoundations/open_clip
"""
import os
import json
import math
import http.client
import zipfile
import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# the ViT of the encoder and the decoder (open_clip style, as modeling/modules/blocks.py)

class Attention(nn.Module):
    """nn.MultiheadAttention's parameters (packed q, k, v), batch first, SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x):
        B, T, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3C)
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))

class MLP(nn.Module):

    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact (erf) GELU, as released

class Block(nn.Module):

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, x):  # pre-LN
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

def run_blocks(blocks, x, checkpointing):
    for block in blocks:
        if checkpointing:  # recomputed in backward: one block's activations kept, not all
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x

def vit_flops(W, L, S):
    # multiply-adds of L blocks, width W, S tokens: q, k, v, out, MLP; attention
    return L * (12 * W * W * S + 2 * S * S * W)

# -----------------------------------------------------------------------------
# the encoder: image patches and N learned latent tokens in, the latent tokens' outputs out

class Encoder(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        W = cfg.enc_width
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.out_channels = cfg.token_size * (2 if cfg.quantize == 'kl' else 1)  # KL: mean, logvar
        self.patch_embed = nn.Conv2d(3, W, cfg.patch_size, stride=cfg.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(1, W))
        self.positional_embedding = nn.Parameter(torch.zeros(n_patches + 1, W))
        self.latent_token_positional_embedding = nn.Parameter(torch.zeros(cfg.num_latent_tokens, W))
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = nn.ModuleList([Block(W, cfg.enc_heads) for _ in range(cfg.enc_layers)])
        self.checkpointing = False
        self.ln_post = nn.LayerNorm(W)
        self.conv_out = nn.Conv2d(W, self.out_channels, 1)  # 1x1, as released

    def forward(self, img, latent_tokens):
        B, N = img.shape[0], latent_tokens.shape[0]
        x = self.patch_embed(img).flatten(2).transpose(1, 2)  # (B, P, W)
        x = torch.cat([self.class_embedding.expand(B, 1, -1), x], dim=1)  # (B, 1+P, W)
        x = x + self.positional_embedding
        z = (latent_tokens + self.latent_token_positional_embedding).expand(B, -1, -1)  # (B, N, W)
        x = self.ln_pre(torch.cat([x, z], dim=1))  # (B, 1+P+N, W): [cls, patches, latents]
        x = run_blocks(self.transformer, x, self.checkpointing)
        x = self.ln_post(x[:, -N:])  # (B, N, W), the latent positions only
        return F.linear(x, self.conv_out.weight.flatten(1), self.conv_out.bias)  # (B, N, C_out)

# -----------------------------------------------------------------------------
# the two bottlenecks

def at_least_fp32(x):
    # fp32 where autocast made x 16-bit; float64 stays (a parity test runs in it)
    return x.to(torch.promote_types(x.dtype, torch.float32))

def code_stats(counts):
    # (K,) uses of each code -> the perplexity (codes in use, evenly) and the share ever used
    p = counts / counts.sum()
    return torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()), (counts > 0).float().mean()

class VectorQuantizer(nn.Module):
    """Nearest-code VQ, straight-through (modeling/quantizer/quantizer.py)."""

    def __init__(self, codebook_size, token_size, commitment_cost, use_l2_norm):
        super().__init__()
        self.commitment_cost = commitment_cost
        self.use_l2_norm = use_l2_norm
        self.embedding = nn.Embedding(codebook_size, token_size)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)

    def codes(self):
        if self.use_l2_norm:
            return F.normalize(self.embedding.weight, dim=-1)
        return self.embedding.weight

    @torch.autocast('cuda', enabled=False)
    def forward(self, z):
        z = features = at_least_fp32(z)  # fp32: bf16 would tie near codes
        if self.use_l2_norm:
            z = F.normalize(z, dim=-1)
        e = self.codes()  # (K, C)
        d = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * z @ e.t()  # (B, N, K)
        ids = d.argmin(-1)  # (B, N)
        z_q = F.embedding(ids, e)  # (B, N, C)
        commitment = self.commitment_cost * F.mse_loss(z, z_q.detach())  # (B, N, C) z -> code
        codebook = F.mse_loss(z_q, z.detach())  # code -> z
        z_q = z + (z_q - z).detach()  # straight-through: forward is z_q, gradient flows to z
        ones = z.new_ones(ids.numel())
        counts = z.new_zeros(e.shape[0]).index_add_(0, ids.flatten(), ones)  # no host sync
        perplexity, usage = code_stats(counts)
        aux = dict(quantizer_loss=commitment + codebook, commitment_loss=commitment,
                   codebook_loss=codebook, ids=ids, perplexity=perplexity, usage=usage,
                   features=features.detach())  # for the training-time codebook clustering
        return z_q, aux

class DiagonalGaussian:
    """The KL ('vae') bottleneck."""

    def __init__(self, params):
        self.mean, logvar = at_least_fp32(params).chunk(2, dim=-1)  # (B, N, C) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None, noise=None):
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device)
        return self.mean + self.std * noise

    def kl(self):  # KL(q || N(0, I)), (B,): summed over tokens and channels
        return 0.5 * (self.mean.pow(2) + self.std.pow(2) - 1.0 - self.logvar).sum(dim=(1, 2))

# -----------------------------------------------------------------------------
# the text-aware decoder: [cls, image queries, N latents, 77 text tokens] in, pixels out

class Unpatchify(nn.Module):
    """The release's einops 'b (p1 p2 c) h w -> b c (h p1) (w p2)'. nn.PixelShuffle orders
    (c, p1, p2): it would scramble the weights."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        B, _, h, w = x.shape
        x = x.view(B, self.p, self.p, 3, h, w)  # (B, p1, p2, c, h, w)
        x = x.permute(0, 3, 4, 1, 5, 2)  # (B, c, h, p1, w, p2)
        return x.reshape(B, 3, h * self.p, w * self.p)

class Decoder(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        W, T = cfg.dec_width, cfg.text_context_length
        self.grid = cfg.image_size // cfg.patch_size
        self.decoder_embed = nn.Linear(cfg.token_size, W)
        self.class_embedding = nn.Parameter(torch.zeros(1, W))
        self.positional_embedding = nn.Parameter(torch.zeros(self.grid ** 2 + 1, W))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, W))  # the query of each patch
        self.latent_token_positional_embedding = nn.Parameter(torch.zeros(cfg.num_latent_tokens, W))
        self.text_guidance_proj = nn.Linear(cfg.text_embed_dim, W)
        self.text_guidance_positional_embedding = nn.Parameter(torch.zeros(T, W))
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = nn.ModuleList([Block(W, cfg.dec_heads) for _ in range(cfg.dec_layers)])
        self.checkpointing = False
        self.ln_post = nn.LayerNorm(W)
        to_pixels = nn.Conv2d(W, cfg.patch_size ** 2 * 3, 1)
        self.ffn = nn.Sequential(to_pixels, Unpatchify(cfg.patch_size))
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, z, text_guidance):
        B, N, _ = z.shape
        P = self.grid ** 2
        z = self.decoder_embed(z) + self.latent_token_positional_embedding[:N]  # (B, N, W)
        cls = self.class_embedding.expand(B, 1, -1)
        q = torch.cat([cls, self.mask_token.expand(B, P, -1)], dim=1) + self.positional_embedding
        t = self.text_guidance_proj(text_guidance)  # (B, 77, W)
        t = t + self.text_guidance_positional_embedding
        x = self.ln_pre(torch.cat([q, z, t], dim=1))  # (B, 1+P+N+77, W)
        x = run_blocks(self.transformer, x, self.checkpointing)
        x = self.ln_post(x[:, 1:1 + P])  # (B, P, W), the image queries
        x = x.transpose(1, 2).reshape(B, -1, self.grid, self.grid)  # (B, W, h, w)
        return self.conv_out(self.ffn(x))  # (B, 3, H, W) in [0, 1], not clamped

# -----------------------------------------------------------------------------
# the tokenizer

@dataclass
class TATiTokConfig:
    image_size: int = 256
    patch_size: int = 16
    num_latent_tokens: int = 32   # N, the length of the 1D token sequence
    quantize: str = 'vq'          # 'vq' (codes) or 'kl' (Gaussian; 'vae' released)
    token_size: int = 64          # C, channels per token: 64 for VQ, 16 for KL
    codebook_size: int = 8192     # VQ only
    enc_width: int = 768          # ViT-B ('bl' releases); 512 for ViT-S ('sl')
    enc_layers: int = 12
    enc_heads: int = 12
    dec_width: int = 1024         # ViT-L in every release
    dec_layers: int = 24
    dec_heads: int = 16
    text_embed_dim: int = 768     # width of the CLIP text tower (ViT-L-14-336)
    text_context_length: int = 77
    commitment_cost: float = 0.25
    use_l2_norm: bool = False     # VQ on the unit sphere (off in every release)

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
            self.quantize = VectorQuantizer(config.codebook_size, config.token_size,
                                            config.commitment_cost, config.use_l2_norm)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Training init, as the release:
        | cls, position and latent embeddings | randn * width^-0.5                   |
        | encoder Linear and Conv             | trunc_normal(std 0.02), bias 0       |
        | decoder Linear and Conv             | torch defaults (kaiming uniform)     |
        | LayerNorm; attention in_proj        | 1 and 0; xavier (MultiheadAttention) |
        | codebook                            | uniform(+-1/K)                       |
        The release inits TiTok before it swaps in the text-aware decoder: std 0.02 in both
        output convs would starve the decoder of gradient (the mean image for many steps)."""
        if self.latent_tokens.device.type == 'meta':
            return
        for m in self.encoder.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        embeddings = ('class_embedding', 'positional_embedding', 'latent_tokens', 'mask_token')
        for name, p in self.named_parameters():
            if name.endswith(embeddings):
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, img, text_guidance, sample=True, noise=None):
        """img (B, 3, H, W) in [0, 1], text_guidance (B, 77, T) -> (recon, loss terms).
        KL: a sample (of `noise`: the trainer's, per global sample) or the mean."""
        z = self.encoder(img, self.latent_tokens)  # (B, N, C), or (B, N, 2C) for KL
        if self.config.quantize == 'vq':
            z, aux = self.quantize(z)
        else:
            posterior = DiagonalGaussian(z)
            z = posterior.sample(noise=noise) if sample else posterior.mean
            aux = dict(kl_loss=posterior.kl().mean())
        return self.decoder(z, text_guidance), aux

    @torch.no_grad()
    def encode(self, img, sample=True, generator=None):
        """VQ code ids (B, N); KL latents (B, N, C): a sample as released, or the mean."""
        z = self.encoder(img, self.latent_tokens)
        if self.config.quantize == 'vq':
            return self.quantize(z)[1]['ids']
        posterior = DiagonalGaussian(z)
        return posterior.sample(generator) if sample else posterior.mean

    @torch.no_grad()
    def encode_posterior(self, img):  # KL: (mean, logvar), each (B, N, C)
        assert self.config.quantize == 'kl'
        posterior = DiagonalGaussian(self.encoder(img, self.latent_tokens))
        return posterior.mean, posterior.logvar

    def decode_tokens(self, tokens, text_guidance):
        """VQ ids (B, N) or KL latents (B, N, C) -> images (B, 3, H, W), not clamped."""
        if self.config.quantize == 'vq':
            tokens = F.embedding(tokens, self.quantize.codes())  # (B, N, C)
        return self.decoder(tokens, text_guidance)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32, **overrides):
        # a release ('vq128', ...) or anything read_weights reads
        path, config, sd = read_model(name_or_path, TATITOK_PRESETS, TATiTokConfig,
                                      config_from_state_dict, dtype, overrides,
                                      "a generator's checkpoint, not a tokenizer's")
        with torch.device('meta'):  # no weights drawn only to be replaced by the file's
            model = cls(config).to(dtype)
        print(f"loading TA-TiTok from {path} ({model.get_num_params() / 1e6:.2f}M parameters)")
        # quantize.embed_prob: code usage of the release's clustering VQ, unused here
        return load_official(model, sd, path, ignore=('quantize.embed_prob',)).eval()

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type='cpu',
                             encoder_lr_scale=1.0):
        # the encoder and latent tokens train at encoder_lr_scale x lr (1 as released)
        named = list(self.named_parameters())
        prefixes = ('encoder.', 'latent_tokens')
        encoder = [(n, p) for n, p in named if n.startswith(prefixes)]
        rest = [(n, p) for n, p in named if not n.startswith(prefixes)]
        groups = [dict(g, lr_scale=encoder_lr_scale) for g in param_groups(encoder, weight_decay)]
        groups += [dict(g, lr_scale=1.0) for g in param_groups(rest, weight_decay)]
        fused = device_type in ('cuda', 'cpu')
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def activation_bytes(self):
        """Bytes of a training step under 16-bit autocast, for runtime.memory_plan: a block keeps
        36 per token and width unit (fp32 LayerNorm inputs; 16-bit q, k, v, attention output,
        matmul inputs, MLP hidden, GELU input) and the attention's LSE."""
        cfg = self.config
        P, N = (cfg.image_size // cfg.patch_size) ** 2, cfg.num_latent_tokens
        We, Wd = cfg.enc_width, cfg.dec_width
        Te, Td = 1 + P + N, 1 + P + N + cfg.text_context_length
        enc = 36 * Te * We + 4 * cfg.enc_heads * Te
        dec = 36 * Td * Wd + 4 * cfg.dec_heads * Td
        rest = 4 * (Te * We + Td * Wd) + 10 * P * Wd + 20 * cfg.image_size ** 2  # small
        rest += 2 * cfg.text_context_length * cfg.text_embed_dim
        inputs = 4 * (cfg.enc_layers * Te * We + cfg.dec_layers * Td * Wd)
        return dict(saved=cfg.enc_layers * enc + cfg.dec_layers * dec + rest,
                    checkpointed=inputs + max(enc, dec) + rest,
                    casts=2 * self.get_num_params(), transient=0)

    def estimate_flops(self, encode=True):
        # FLOPs per image, 2 per multiply-add (checked against torch's FlopCounterMode)
        cfg = self.config
        P = (cfg.image_size // cfg.patch_size) ** 2
        N, p, T = cfg.num_latent_tokens, cfg.patch_size, cfg.text_context_length
        We, Wd = cfg.enc_width, cfg.dec_width
        # the decoder: token and text projections, the ViT, the output convs
        macs = N * cfg.token_size * Wd + T * cfg.text_embed_dim * Wd
        macs += vit_flops(Wd, cfg.dec_layers, 1 + P + N + T)
        macs += P * Wd * 3 * p * p + cfg.image_size ** 2 * 3 * 3 * 9
        if encode:  # patch embedding, the ViT over [cls, patches, latents], conv_out
            macs += P * 3 * p * p * We + vit_flops(We, cfg.enc_layers, 1 + P + N)
            macs += N * We * self.encoder.out_channels
            if cfg.quantize == 'vq':
                macs += N * cfg.codebook_size * cfg.token_size  # the VQ distances
        return 2 * macs

# -----------------------------------------------------------------------------
# the frozen CLIP text encoder and its three views

def clip_ids(tokenizer, caption, context_length=77):
    # a caption too long is truncated with a warning, not an error
    with torch.device('cpu'):  # whatever the default device (e.g. meta)
        ids = tokenizer([caption], context_length=context_length)[0].numpy()  # (77,)
    if ids[-1] != 0 and len(tokenizer.encode(caption)) > context_length - 2:  # minus SOT, EOT
        warnings.warn(f"a caption longer than {context_length} CLIP tokens was truncated: "
                      f"{caption[:60]!r}...")
    return ids

def text_tower(text_cfg, embed_dim, quick_gelu=False, weights=None, seed=0, dtype=torch.float32):
    """open_clip's text tower alone (the vision tower is most of CLIP): `weights` (a file of
    the tower or the whole CLIP), or random from `seed`."""
    from open_clip.model import _build_text_tower, _build_vision_tower
    if weights:
        with torch.device('meta'):
            tower = _build_text_tower(embed_dim, text_cfg, quick_gelu).to(dtype)
        sd = load_state_dict_file(weights)  # mapped: a cast would read the vision tower too
        sd = {k: v for k, v in sd.items() if not k.startswith('visual.')}
        load_official(tower, sd, weights, ignore=('logit_scale', 'logit_bias'))  # CLIP's, unused
        if tower.attn_mask is not None:  # in no file: built again, off meta
            tower.attn_mask = tower.build_causal_mask()
        return tower
    rng = torch.get_rng_state()
    torch.manual_seed(seed)  # one seed, one tower: a checkpoint can rebuild it
    # CLIP(...) draws a vision tower first, as our checkpoints' seeds did: a tiny one, dropped
    _build_vision_tower(embed_dim, dict(layers=1, width=64, patch_size=8, image_size=16))
    tower = _build_text_tower(embed_dim, text_cfg, quick_gelu)
    torch.set_rng_state(rng)
    return tower.to(dtype)

RELEASE_CLIP = dict(model='ViT-L-14-336', pretrained='openai')

class TextEncoder(nn.Module):
    """A frozen open_clip text tower; one pass gives the release's three views:
    guidance: ln_final of the last block, 77 positions (the TA-TiTok decoder's input)
    tokens:   the penultimate block's output, no ln_final (MaskGen's context stream)
    pooled:   ln_final at the end-of-text token @ text_projection (MaskGen's condition)"""

    def __init__(self, clip, tokenizer, spec):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.spec = spec  # how to rebuild it, kept in checkpoints
        self.width = clip.token_embedding.weight.shape[1]
        self.embed_dim = clip.text_projection.shape[-1]
        self.context_length = clip.positional_embedding.shape[0]
        self.requires_grad_(False).eval()

    @classmethod
    def from_name(cls, name, context_length=77, dtype=torch.float32):
        # --clip: 'tiny', open_clip's MODEL[:TAG or file], or a ViT-L-14-336 file
        if name == 'tiny':
            return cls.tiny(context_length=context_length).to(dtype)
        model, _, pretrained = name.partition(':')
        if not pretrained and os.path.isfile(name):
            return cls.from_open_clip('ViT-L-14-336', name, dtype)
        return cls.from_open_clip(model, pretrained or 'openai', dtype)

    @classmethod
    def from_spec(cls, spec, dtype=torch.float32):
        if 'text_cfg' in spec:
            return cls.from_text_cfg(**spec, dtype=dtype)
        return cls.from_open_clip(**spec, dtype=dtype)

    @classmethod
    def from_open_clip(cls, model='ViT-L-14-336', pretrained='openai', dtype=torch.float32):
        import open_clip  # here: only the text encoder needs it
        if model not in open_clip.list_models():
            raise UserError(f"--clip {model}:{pretrained}: open_clip has no model {model!r}")
        cfg = open_clip.get_model_config(model)
        path, quick_gelu = pretrained, cfg.get('quick_gelu', False)
        if not os.path.isfile(pretrained):  # a tag: downloaded once
            tag = open_clip.pretrained.get_pretrained_cfg(model, pretrained)
            if not tag.get('hf_hub'):
                raise UserError(f"open_clip has no pretrained {pretrained!r} for {model!r}; "
                                f"pass a local file")
            repo, filename = os.path.split(tag['hf_hub'])
            names = [filename]
            if not filename:
                names = ['open_clip_model.safetensors', 'open_clip_pytorch_model.bin']
            path = hf_download(repo, names)
            quick_gelu = quick_gelu or tag.get('quick_gelu', False)  # OpenAI's have it
        tower = text_tower(cfg['text_cfg'], cfg['embed_dim'], quick_gelu, path, dtype=dtype)
        spec = dict(model=model, pretrained=pretrained)
        return cls(tower, open_clip.get_tokenizer(model), spec)

    @classmethod
    def from_text_cfg(cls, text_cfg, embed_dim, weights=None, seed=0, tokenizer='ViT-L-14-336',
                      dtype=torch.float32):
        import open_clip
        tower = text_tower(text_cfg, embed_dim, weights=weights, seed=seed, dtype=dtype)
        spec = dict(text_cfg=text_cfg, embed_dim=embed_dim, weights=weights, seed=seed,
                    tokenizer=tokenizer)
        return cls(tower, open_clip.get_tokenizer(tokenizer), spec)

    @classmethod
    def tiny(cls, context_length=77):
        """A small random tower for tests and the offline quickstart: random features still tell
        captions apart. The shapes presets use 16 positions (their captions fit in 14 tokens)."""
        text_cfg = dict(context_length=context_length, vocab_size=49408, width=64, heads=4,
                        layers=4)
        return cls.from_text_cfg(text_cfg, 64)

    def tokenize(self, captions):
        ids = [clip_ids(self.tokenizer, c, self.context_length) for c in captions]
        return torch.stack([torch.from_numpy(x) for x in ids])  # (B, 77)

    @torch.no_grad()
    def forward(self, captions):
        device = self.clip.token_embedding.weight.device
        ids = captions if torch.is_tensor(captions) else self.tokenize(captions)
        ids = ids.to(device)  # (B, 77)
        x = self.clip.token_embedding(ids) + self.clip.positional_embedding  # (B, 77, W)
        blocks = self.clip.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x, attn_mask=self.clip.attn_mask)  # causal, as CLIP was trained
        penultimate = x
        x = blocks[-1](x, attn_mask=self.clip.attn_mask)
        guidance = self.clip.ln_final(x)  # (B, 77, W)
        eot = ids.argmax(dim=-1)  # (B,), the end-of-text token has the highest id
        pooled = guidance[torch.arange(ids.shape[0], device=device), eot]  # (B, W)
        pooled = pooled @ self.clip.text_projection  # (B, E), not normalised
        return dict(guidance=guidance, tokens=penultimate, pooled=pooled)

    def estimate_flops(self):
        # per caption: every position through every block (a causal mask saves no matmul)
        L = len(self.clip.transformer.resblocks)
        W = self.width
        return 2 * (vit_flops(W, L, self.context_length) + W * self.embed_dim)

# -----------------------------------------------------------------------------
# presets: the six releases (repo ids from the official README), small ones for CPU

_HF = 'turkeyju/tokenizer_tatitok_'
_VQ = dict(quantize='vq', token_size=64)
_KL = dict(quantize='kl', token_size=16)
_S = dict(enc_width=512, enc_layers=8, enc_heads=8)  # ViT-S; the others: the defaults
_TINY = dict(image_size=32, patch_size=8, num_latent_tokens=8, enc_width=64, enc_layers=2,
             enc_heads=4, dec_width=64, dec_layers=2, dec_heads=4,
             text_embed_dim=64)  # TextEncoder.tiny()'s
# the CPU quickstart's (TUNING.md says how each number was chosen)
_SHAPES = dict(image_size=32, patch_size=4, num_latent_tokens=32, enc_width=64, enc_layers=1,
               enc_heads=2, dec_width=64, dec_layers=3, dec_heads=2, text_embed_dim=64,
               text_context_length=16)
TATITOK_PRESETS = {
    'vq32': dict(**_VQ, num_latent_tokens=32, repo=_HF + 'bl32_vq'),  # 390.8M
    'vq64': dict(**_VQ, num_latent_tokens=64, repo=_HF + 'bl64_vq'),  # 390.9M
    'vq128': dict(**_VQ, num_latent_tokens=128, repo=_HF + 'bl128_vq'),  # 391.1M
    'kl32': dict(**_KL, num_latent_tokens=32, repo=_HF + 'bl32_vae'),  # 390.2M
    'kl64': dict(**_KL, num_latent_tokens=64, repo=_HF + 'bl64_vae'),  # 390.3M
    'kl128': dict(**_KL, num_latent_tokens=128, **_S, repo=_HF + 'sl128_vae'),  # 330.3M
    'tiny-vq': dict(quantize='vq', token_size=12, codebook_size=96, **_TINY),
    'tiny-kl': dict(quantize='kl', token_size=5, **_TINY),
    # VQ on the unit sphere, no commitment loss (the release's is 0.25): see TUNING.md
    'shapes-vq': dict(quantize='vq', token_size=16, codebook_size=1024, use_l2_norm=True,
                      commitment_cost=0.0, **_SHAPES),
    'shapes-kl': dict(quantize='kl', token_size=16, **_SHAPES),
}

def preset_config(presets, config_class, name, **overrides):
    # keys config_class has no field for (a repo) stay out
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
    """A user's mistake: one line and exit 2 (runtime.run_main)."""

    def __init__(self, message):
        super().__init__(' '.join(str(message).split()))  # one line, whatever it quotes

class DownloadError(UserError):
    """A release's file neither cached nor downloadable."""

SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16,
                      'BF16': torch.bfloat16, 'I64': torch.int64, 'I32': torch.int32,
                      'U8': torch.uint8, 'BOOL': torch.bool}

def read_safetensors(path, dtype):
    """A .safetensors file read a tensor at a time, floats cast to `dtype`: mapped, every fp32
    page read for the cast would stay in memory beside the copies."""
    with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little')  # the JSON header's length
        header = json.loads(f.read(n))
        header.pop('__metadata__', None)
        # one buffer for all: one per tensor would leave the allocator's heap in pieces
        size = max(h['data_offsets'][1] - h['data_offsets'][0] for h in header.values())
        buf = torch.empty(size, dtype=torch.uint8)
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
    """A torch.save or .safetensors file's dict, memory-mapped (load_official then holds each
    weight once) unless read for another dtype."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        if path.endswith('.safetensors') and dtype != torch.float32:
            sd = read_safetensors(path, dtype)
        elif path.endswith('.safetensors'):
            from safetensors.torch import load_file  # arrives with open_clip_torch
            sd = load_file(path)
        else:  # torch.save's zip format maps; an older file is read whole
            mapped = zipfile.is_zipfile(path)
            sd = torch.load(path, map_location='cpu', weights_only=True, mmap=mapped)
    except Exception as e:  # truncated, corrupt, or not a checkpoint
        why = f"{type(e).__name__}: {str(e)[:200]}"
        raise UserError(f"{path}: not a readable checkpoint ({why})") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    return sd

def reachable(host):
    # offline, download libraries retry for ~25 s: a 3 s probe fails fast and clearly
    try:
        http.client.HTTPSConnection(host, timeout=3.0).connect()
        return True
    except OSError:
        return False

def hf_download(repo_id, filenames):
    # the first of `filenames` in a Hugging Face repo: cached, else downloaded
    from huggingface_hub import hf_hub_download, constants  # only official weights need it
    host = constants.ENDPOINT.split('://')[-1].split('/')[0]
    for local in (True, False):
        if not local and (constants.HF_HUB_OFFLINE or not reachable(host)):
            break
        for name in filenames:
            try:
                return hf_hub_download(repo_id, name, local_files_only=local)
            except Exception:
                pass
    raise DownloadError(f"cannot get {' or '.join(filenames)} from the Hugging Face repo "
                        f"{repo_id} (not cached; offline?): pass a local file")

def load_official(model, sd, source, ignore=(), optional=(), rename=()):
    """`sd` into `model`, every key and shape checked. Its tensors become the parameters: a
    model built on the meta device from a mapped file holds each weight once. ignore: keys
    dropped; optional: keys that may be missing (a tied weight); rename: (official, our)."""
    sd = {k: v for k, v in sd.items() if k not in ignore}
    for old, new in rename:
        sd = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}
    ours = model.state_dict()
    missing = [k for k in ours if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in ours]
    if missing or unexpected:
        raise UserError(f"{source}: keys do not match the {type(model).__name__} architecture "
                        f"(missing {len(missing)}: {missing[:5]}, "
                        f"unexpected {len(unexpected)}: {unexpected[:5]})")
    wrong = [f"{k} {tuple(v.shape)} vs ours {tuple(ours[k].shape)}"
             for k, v in sd.items() if v.shape != ours[k].shape]
    if wrong:
        raise UserError(f"{source}: {len(wrong)} tensors have the wrong shape, "
                        f"e.g. {wrong[:3]}")
    sd = {k: v.to(ours[k].dtype) for k, v in sd.items()}  # a no-op where dtypes agree
    for k in optional:  # a placeholder until tied again
        if k not in sd and k in ours:
            sd[k] = ours[k]
    model.load_state_dict(sd, strict=True, assign=True)
    return model

def read_weights(name_or_path, presets, dtype=torch.float32):
    """A release's name or repo id, a weights file, a run folder or a checkpoint's dict ->
    (where from, official weights or our checkpoint), which may be passed again."""
    if isinstance(name_or_path, tuple):
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
        raise UserError(f"{name_or_path}: no such file, no ckpt.pt in it, and no release "
                        f"of that name ({', '.join(sorted(releases.values()))})")
    return path, load_state_dict_file(path, dtype)

def read_model(name_or_path, presets, config_class, from_shapes, dtype, overrides, other):
    # our checkpoint holds its config; from_shapes reads official weights'; other: a refusal
    path, sd = read_weights(name_or_path, presets, dtype)
    if 'model_args' not in sd:
        return path, config_class(**{**from_shapes(sd, path), **overrides}), sd
    if not sd['model_args'].keys() <= {f.name for f in fields(config_class)}:
        raise UserError(f"{path}: {other}")
    return path, config_class(**{**sd['model_args'], **overrides}), checkpoint_weights(sd)

def load_tokenizer(name_or_path, clip=None):
    # the text encoder: --clip's, else the checkpoint's, else the releases'
    read = read_weights(name_or_path, TATITOK_PRESETS)
    tok = TATiTok.from_pretrained(read)
    cfg = tok.config
    if clip:
        te = TextEncoder.from_name(clip, cfg.text_context_length)
    else:
        te = TextEncoder.from_spec(read[1].get('text_encoder') or RELEASE_CLIP)
    if (te.context_length, te.width) != (cfg.text_context_length, cfg.text_embed_dim):
        raise UserError(f"the tokenizer's decoder reads {cfg.text_context_length} x "
                        f"{cfg.text_embed_dim} text features, this text encoder gives "
                        f"{te.context_length} x {te.width}: pass its --clip")
    return tok, te, read

def config_from_state_dict(sd, path):
    """TATiTokConfig fields read off official weights' shapes; heads are not in them, but every
    release has 64 channels per head."""
    depth = lambda p: len({k.split('.')[2] for k in sd if k.startswith(p + '.transformer.')})
    try:
        N, enc_width = sd['latent_tokens'].shape
        dec_width, text_embed_dim = sd['decoder.text_guidance_proj.weight'].shape
        patch_size = sd['encoder.patch_embed.weight'].shape[-1]
        grid = math.isqrt(sd['encoder.positional_embedding'].shape[0] - 1)
        vq = 'quantize.embedding.weight' in sd
        codebook_size = sd['quantize.embedding.weight'].shape[0] if vq else 8192
        T = sd['decoder.text_guidance_positional_embedding'].shape[0]
        return dict(image_size=grid * patch_size, patch_size=patch_size,
                    num_latent_tokens=N, quantize='vq' if vq else 'kl',
                    token_size=sd['decoder.decoder_embed.weight'].shape[1],
                    codebook_size=codebook_size, enc_width=enc_width,
                    enc_layers=depth('encoder'), enc_heads=enc_width // 64,
                    dec_width=dec_width, dec_layers=depth('decoder'), dec_heads=dec_width // 64,
                    text_embed_dim=text_embed_dim, text_context_length=T)
    except (KeyError, ValueError, AttributeError):
        raise UserError(f"{path}: not a TA-TiTok state dict (expected keys like "
                        f"'latent_tokens', 'encoder.patch_embed.weight')") from None

def checkpoint_weights(ckpt):
    # our checkpoint's EMA weights when it has them (as DiT)
    return ckpt['model'] if ckpt.get('ema') is None else ckpt['ema']

def param_groups(named_parameters, weight_decay):
    """The release's AdamW groups (utils/train_utils.py): no decay for vectors, nor for names
    holding one of these words (so not the adaLN linears, named *norm*)."""
    keys = ('ln', 'bias', 'latent_tokens', 'mask_token', 'embedding', 'norm', 'gamma', 'embed')
    decay, no_decay = [], []
    for n, p in named_parameters:
        if p.ndim < 2 or any(key in n for key in keys):
            no_decay.append(p)
        else:
            decay.append(p)
    return [dict(params=decay, weight_decay=weight_decay),
            dict(params=no_decay, weight_decay=0.0)]
