"""Multi-scale DeLF extraction of one image: the Python API behind extractor.py.

Per image: shrink to ``max_image_size`` if needed; for each pyramid scale one forward pass gives
the feature map F and the attention a; cells with a >= ``attn_thres`` are kept, all scales are
concatenated, NMS on the receptive boxes (IoU ``iou_thres``, by attention) prunes them and the
best ``top_k`` stay. Descriptors: L2-normalise, then, with the PCA file (extract/extraction/pca.py), subtract
its mean, project on the first ``pca_dims`` components, divide by sqrt(variance) only when
``use_whitening`` (off by default, as the official DeLF), L2-normalise again.

Keypoint convention (``boxes="half_pixel"``, the default): resizing is bilinear with
``align_corners=False`` (torch's half-pixel convention), antialiased when shrinking. An image whose
longest side exceeds ``max_image_size`` is first shrunk to it; each pyramid level then has size
round(side * scale) of that image. Keypoints are mapped back to the ORIGINAL image with the actual
per-axis ratio r = scaled size / original size (the two resizes compose into one such ratio):
x_orig = (x_scaled + 0.5) / r - 0.5.

The official DELF extractor's conventions (``resize="tf1"``, ``boxes="official"``: converted
official models default to them): TF1 ``resize_bilinear`` without half-pixel centres
(:func:`extract.extraction.images.resize_tf1`), and boxes divided by the nominal scale times the shrink ratio,
with no half-pixel shift, so the centre of cell (i, j) is at stride * (i, j) / scale.

Precision: fp32 by default. With ``amp`` on a CPU that computes bf16 natively (avx512_bf16 or
amx_bf16: :func:`train.runtime.native_bf16`) the inference copy holds its weights in bf16 and runs
without autocast (:func:`to_bf16` says which parts stay float32 and why); on a CPU that would
emulate bf16, several times slower than fp32, ``amp`` is dropped with a one-line warning. On CUDA
``amp`` is autocast.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.nn.utils.fusion import fuse_conv_bn_eval

from extract.config import MIN_IMAGE_SIDE, ExtractionConfig, with_recorded
from extract.errors import OptionError
from extract.extraction.images import fit_size, resize_tf1, shrink, to_rgb
from extract.extraction.pca import PCA_KEYS, PcaError, apply_pca, load_pca
from train.checkpoint import load_model
from train.delf import Delf, ReceptiveField
from train.delg import GLOBAL_SCALES, Delg, pool_scales
from train.outputs import file_sha256
from train.runtime import amp_dtype, autocast, cudnn_benchmark, native_bf16

log = logging.getLogger("delf")

# fp16 (--amp on a GPU without bf16) holds up to 65504: folded weights or biases above this, times
# activations of a few tens, would overflow it
FP16_SAFE_WEIGHT = 2048.0
SCALE_TOLERANCE = 1e-3  # a pyramid scale within this of a global scale shares its forward pass
# (conv, BatchNorm) child pairs where the BN directly follows the conv: ResNet blocks, the
# downsample and base Sequentials, the attention head.
_CONV_BN = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("conv1", "bn"), ("0", "1"))
log = logging.getLogger("delf")


def too_small(width: int, height: int, max_image_size: int) -> str | None:
    """Why an image of this size gives no features, or None when it is large enough."""
    w, h = fit_size(width, height, max_image_size)
    if min(w, h) >= MIN_IMAGE_SIDE:
        return None
    shrunk = f" ({w}x{h} after --max_image_size {max_image_size})" if (w, h) != (width, height) else ""
    return f"too small: {width}x{height} px{shrunk}; the shorter side must be at least {MIN_IMAGE_SIDE} px"


def to_original(boxes: torch.Tensor, ratio: tuple[float, float], half_pixel: bool = True) -> torch.Tensor:
    """[x1, y1, x2, y2] boxes from scaled-image to original-image pixels: with ``half_pixel``
    x -> (x + 0.5) / r - 0.5, else x -> x / r (the official extractor's). Python-scalar arithmetic
    only: no host-to-device copy."""
    shift = 0.5 if half_pixel else 0.0
    out = boxes + shift
    out[:, 0::2] /= ratio[0]
    out[:, 1::2] /= ratio[1]
    return out - shift


def cell_boxes(rf: ReceptiveField, height: int, width: int, ratio: tuple[float, float],
               device: str | torch.device = "cpu", half_pixel: bool = True) -> torch.Tensor:
    """Receptive boxes (h*w, 4) [x1, y1, x2, y2] of an (height, width) feature map, row-major, in
    original-image pixels, for a network input that was the original resized by ``ratio`` (x, y)
    (see :func:`to_original`). Made on ``device`` (no copy, so no wait for a GPU)."""
    with torch.device(device):
        return to_original(rf.boxes(height, width), ratio, half_pixel)


def box_centres(boxes: torch.Tensor) -> torch.Tensor:
    """Keypoints (N, 2) x, y: the centres of [x1, y1, x2, y2] boxes."""
    return (boxes[:, :2] + boxes[:, 2:]) / 2


def nms_top_k(boxes: torch.Tensor, scores: torch.Tensor, iou_thres: float, top_k: int,
              count: int | None = None) -> torch.Tensor:
    """Indices of the first ``top_k`` boxes kept by greedy NMS, by descending score; only the
    ``count`` best-scored boxes are candidates (all by default).

    Greedy NMS decides each box from the higher-scored boxes only, so NMS over the best m boxes
    gives the same first picks as over all of them: m grows until ``top_k`` are kept, which avoids
    the quadratic cost on tens of thousands of boxes when few are suppressed.
    """
    order = torch.sort(scores, descending=True, stable=True).indices[:count]
    m = top_k + top_k // 4
    while True:
        best = order[:m]
        keep = best[torchvision.ops.nms(boxes[best], scores[best], iou_thres)]
        if len(keep) >= top_k or m >= len(order):
            return keep[:top_k]
        m *= 4


def gather_rows(rows: list[torch.Tensor], order: torch.Tensor) -> torch.Tensor:
    """Rows ``order`` of ``torch.cat(rows)`` as float, without materialising the concatenation
    (tens of thousands of C-wide rows at large scales) and without data-dependent shapes (no
    wait for a GPU): each block is gathered at clamped indices and blended in where it owns them."""
    out = torch.zeros(len(order), rows[0].shape[1], device=order.device)
    start = 0
    for block in rows:
        local = order - start
        mine = (local >= 0) & (local < len(block))
        out = torch.where(mine[:, None], block[local.clamp(0, len(block) - 1)].float(), out)
        start += len(block)
    return out


def fold_batchnorm(model: Delf) -> Delf:
    """An inference copy of ``model`` with each BatchNorm folded into the conv before it: the same
    outputs (up to float rounding), faster: one convolution instead of a convolution and a BatchNorm.
    ``model`` itself is left untouched."""
    model = copy.deepcopy(model).eval().requires_grad_(False)
    for module in model.modules():
        for conv_name, bn_name in _CONV_BN:
            conv, bn = module._modules.get(conv_name), module._modules.get(bn_name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn).requires_grad_(False))
                setattr(module, bn_name, nn.Identity())
    return model


def largest_weight(model: nn.Module) -> tuple[float, str]:
    """The largest |value| among the weights and biases of the convolutions and linear layers
    (BatchNorm folded into them by :func:`fold_batchnorm`), and the parameter that holds it."""
    found = [(p.detach().abs().max().item(), f"{module_name}.{name}")
             for module_name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))
             for name, p in module.named_parameters(recurse=False) if p.numel()]
    return max(found, default=(0.0, ""))


def conf_in_effect(conf: ExtractionConfig, pca: bool) -> ExtractionConfig:
    """The configuration an extractor applies (its feature files' attributes): the scales as
    floats; without a PCA file (``pca`` False) no PCA, no whitening and 0 dimensions."""
    return replace(conf, scale_list=tuple(float(s) for s in conf.scale_list), use_pca=pca,
                   pca_dims=conf.pca_dims if pca else 0, use_whitening=conf.use_whitening and pca)


class Cast(nn.Module):
    """Casts its input to ``dtype``: a border between the bf16 and the float32 parts of a model."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}"


def to_bf16(model: Delf | Delg) -> Delf | Delg:
    """``model`` (an inference copy: BatchNorm folded) with the bulk of its arithmetic in bf16,
    changed in place and returned; run it without autocast.

    In bf16 (weights and activations): the backbone (convolutions with their BatchNorm folded in,
    ReLUs, residual sums, max-pools) to the local feature map, the attention's first 1x1
    convolution (C -> 512), and with DELG its layer4 and the autoencoder's encoder (the local
    descriptors). The feature map leaves the model in bf16; the extractor gathers the selected
    rows as float32.

    In float32, with the reason:

    - the input normalisation, cast to bf16 once at its end (one rounding of the pixels);
    - the attention's last convolution (512 -> 1) and softplus, i.e. the scores: they are compared
      with the threshold and sorted, and bf16 would round them to about three significant digits
      (steps of 0.5 near the official threshold 100), making ties fp32 does not have; 512
      multiply-adds per cell cost nothing;
    - the extractor's L2 normalisations and PCA: subtracting the PCA mean from a unit descriptor
      cancels leading digits, and bf16 has too few left to keep the projected descriptor within
      a cosine of 0.999 of fp32's; with DELG, GeM (a cube), the whitening layer
      and the multi-scale pooling of the global descriptor: one vector per image or row, no cost.

    The feature map itself carries bf16's rounding (relative 2^-9 per operation through the
    backbone), which moves the scores slightly: where the threshold rather than ``top_k`` decides
    the features, their count can differ from fp32's (docs/deviations.md).
    """
    bf16 = [*model.backbone(), model.attn.conv1]
    if isinstance(model, Delg):
        bf16 += [model.layer4, *([model.autoencoder.encoder] if model.autoencoder_dim else [])]
    for module in bf16:
        module.to(torch.bfloat16)
    model.normalize = nn.Sequential(model.normalize, Cast(torch.bfloat16))
    model.attn.conv2 = nn.Sequential(Cast(torch.float32), model.attn.conv2)
    return model


class DelfExtractor:
    """Image -> DeLF keypoints, descriptors, scores, scales and attention maps.

    ``extractor(image)`` takes a PIL image (any mode), a uint8 tensor (3, H, W) or a float tensor
    (3, H, W) in [0, 1] and returns numpy arrays: ``keypoints`` (N, 2) x, y in original pixels,
    ``descriptors`` (N, D) unit-norm, ``scores`` (N,) descending, ``scales`` (N,), ``image_size``
    [w, h], ``attention`` (one (h_s, w_s) map per scale, in ``scales`` order) and
    ``attention_scales``.

    With a DELG model (:class:`~train.delg.Delg`), unless ``global_descriptor`` is False, also
    ``global_descriptor`` (D,) float32, unit length: the GeM descriptors at
    :data:`~train.delg.GLOBAL_SCALES` (0.7071, 1, 1.4142), each L2-normalised, averaged and
    L2-normalised, as the official extractor. A global scale that is also a pyramid scale reuses
    that level's forward pass (layer4 and the global head run on its layer3 features); the others
    take a pass of their own. Images too small for features get a zero vector. The local
    descriptors of a DELG model with an autoencoder are its code (PCA is then not needed).

    ``model`` is copied for inference (BatchNorm folded, channels_last, on ``device``; with
    ``conf.amp`` on a CPU with native bf16 mostly in bf16: :func:`to_bf16`, ``self.bf16`` True) as
    ``self.model``; the caller's model is not modified. ``self.conf`` is the configuration in
    effect (``use_pca`` and ``use_whitening`` False and ``pca_dims`` 0 without a PCA file; ``amp``
    False on a CPU without native bf16): the feature file's attributes. On a GPU ``conf.amp``
    autocasts to :func:`train.runtime.amp_dtype`: bf16 on recent GPUs, fp16 on GPUs without bf16,
    where a folded weight beyond :data:`FP16_SAFE_WEIGHT` makes it run in float32 instead (a
    warning; ``self.conf.amp`` is then False).
    """

    def __init__(self, model: Delf | Delg, conf: ExtractionConfig | None = None, *,
                 pca: dict[str, Any] | None = None, device: str | torch.device = "cpu", checkpoint_sha256: str = "",
                 global_descriptor: bool = True) -> None:
        conf = conf or ExtractionConfig()
        if not conf.scale_list or min(conf.scale_list) <= 0:
            raise OptionError(f"scales must be positive, got {list(conf.scale_list)}")
        if conf.top_k < 1:
            raise OptionError(f"top_k {conf.top_k}: need at least 1")
        if 0 < conf.max_image_size < MIN_IMAGE_SIDE or conf.max_image_size < 0:
            raise OptionError(f"max_image_size {conf.max_image_size}: need 0 (no limit) or at least {MIN_IMAGE_SIDE}")
        if pca is not None and not 1 <= conf.pca_dims <= len(pca["pca_mean"]):
            raise PcaError(f"pca_dims {conf.pca_dims} is outside 1..{len(pca['pca_mean'])} (the PCA file's dimension)")
        if pca is not None and len(pca["pca_mean"]) != model.feature_dim:
            raise PcaError(f"the PCA file is {len(pca['pca_mean'])}-d but the model's descriptors are "
                           f"{model.feature_dim}-d")
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype(self.device)
        cpu_amp = conf.amp and self.device.type == "cpu" and self.amp_dtype == torch.bfloat16
        self.bf16 = cpu_amp and native_bf16()
        emulated = cpu_amp and not self.bf16
        if emulated:
            log.warning("--amp: this CPU has no native bf16 (avx512_bf16/amx_bf16), where bf16 would be slower "
                        "than fp32: extracting in fp32")
        # the configuration in effect: without a PCA file, no PCA and 0 dimensions; amp only where it runs
        self.conf = replace(conf_in_effect(conf, pca is not None), amp=conf.amp and not emulated)
        self.model = fold_batchnorm(model).to(self.device, memory_format=torch.channels_last)
        if self.conf.amp and self.amp_dtype == torch.float16:
            value, name = largest_weight(self.model)
            if value > FP16_SAFE_WEIGHT:
                log.warning("--amp: this GPU has no bf16 and fp16 cannot hold the model safely (|%s| reaches %.3g "
                            "with BatchNorm folded, above %g): extracting in float32", name, value, FP16_SAFE_WEIGHT)
                self.conf = replace(self.conf, amp=False)
        if self.bf16:
            self.model = to_bf16(self.model)
        self.receptive_field = model.receptive_field()
        # on the device once, not per image
        self.pca = None if pca is None else {k: torch.as_tensor(pca[k], device=self.device) for k in PCA_KEYS}
        self.checkpoint_sha256 = checkpoint_sha256
        self.global_scales = GLOBAL_SCALES if global_descriptor and isinstance(model, Delg) else ()
        # which pyramid levels also give a global descriptor, and the global scales needing a pass of their own
        self._global_levels = tuple(any(abs(s - g) < SCALE_TOLERANCE for g in self.global_scales)
                                    for s in self.scales)
        self._global_only_scales = tuple(g for g in self.global_scales
                                         if not any(abs(g - s) < SCALE_TOLERANCE for s in self.scales))

    @property
    def global_dim(self) -> int:
        """Dimension of the global descriptor; 0 when none is extracted."""
        return self.model.global_dim if self.global_scales else 0

    def network_attrs(self) -> dict[str, Any]:
        """What a feature file records of the network: descriptor dimension, architecture, target
        layer, receptive field (size, stride, padding); with a DELG model, ``global_dim`` and
        ``global_scales`` too (DELG only, so that DeLF files keep their attributes)."""
        rf = self.receptive_field
        delg = {"global_dim": self.global_dim, "global_scales": list(self.global_scales)} if self.global_scales else {}
        return {**delg, "descriptor_dim": self.descriptor_dim, "arch": self.model.arch,
                "target_layer": self.model.target_layer, "receptive_field": [rf.size, rf.stride, rf.padding]}

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, pca_path: str | Path | None = None,
                        conf: ExtractionConfig | None = None, *, device: str | torch.device = "cpu"
                        ) -> "DelfExtractor":
        """Build from a keypoint-stage checkpoint (either format) and an optional PCA file, which
        must have been fitted on this checkpoint. No PCA when ``pca_path`` is None or not
        ``conf.use_pca``. Without ``conf``: the defaults, with the settings the checkpoint records
        in their place (a converted official model's, see :func:`extract.config.with_recorded`)."""
        model, ckpt = load_model(checkpoint, stage="inference")
        conf = conf or with_recorded(ExtractionConfig(), ckpt.get("extraction") or {})
        sha = file_sha256(checkpoint)
        pca = load_pca(pca_path, checkpoint_sha256=sha) if conf.use_pca and pca_path is not None else None
        return cls(model, conf, pca=pca, device=device, checkpoint_sha256=sha)

    @property
    def scales(self) -> tuple[float, ...]:
        """The pyramid scales, in extraction order."""
        return self.conf.scale_list

    @property
    def descriptor_dim(self) -> int:
        return self.conf.pca_dims if self.pca is not None else self.model.feature_dim

    # --- geometry --------------------------------------------------------------------------
    def prepare(self, image: Image.Image | torch.Tensor, original_size: tuple[int, int] | None = None
                ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The image as float (3, h, w) in [0, 1] on the device, shrunk to ``max_image_size``,
        and its original size (w, h). Differentiable for float input.

        With ``original_size`` the image was already shrunk from that size by
        :func:`extract.extraction.images.shrink` (as the decoding workers do)."""
        if isinstance(image, Image.Image):
            image = torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1)
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an RGB image (3, H, W), got shape {tuple(image.shape)}")
        height, width = image.shape[-2:]
        if original_size is None:
            original_size = (width, height)
            image = shrink(image, self.conf.max_image_size)
        elif fit_size(*original_size, self.conf.max_image_size) != (width, height):
            raise ValueError(f"a {width}x{height} image is not a {original_size[0]}x{original_size[1]} one "
                             f"shrunk to max_image_size {self.conf.max_image_size}")
        image = image.to(self.device, non_blocking=True)  # asynchronous from pinned memory
        if image.dtype == torch.uint8:
            image = image.float() / 255
        return image, tuple(original_size)

    def scale_image(self, image: torch.Tensor, scale: float, original_size: tuple[int, int]
                    ) -> tuple[torch.Tensor, tuple[float, float]]:
        """Pyramid level ``scale`` of a prepared image (``conf.resize``), and the per-axis ratio
        (x, y) its boxes map to the original with (``conf.boxes``: the actual size ratio, or the
        nominal scale times the shrink ratio)."""
        height, width = image.shape[-2:]
        if self.conf.resize == "tf1":  # the official: round(side * scale) in float32, half to even
            h, w = (max(1, int(torch.round(torch.tensor(n, dtype=torch.float32) * torch.tensor(scale)
                                           ))) for n in (height, width))
            if (h, w) != (height, width):
                image = resize_tf1(image, (h, w))
        else:
            h, w = max(1, round(height * scale)), max(1, round(width * scale))
            if (h, w) != (height, width):
                image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False,
                                      antialias=h < height or w < width)[0]
        if self.conf.boxes == "official":
            return image, (scale * width / original_size[0], scale * height / original_size[1])
        return image, (w / original_size[0], h / original_size[1])

    # --- extraction ------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, image: Image.Image | torch.Tensor, original_size: tuple[int, int] | None = None
                 ) -> dict[str, Any]:
        """Features of one image; ``original_size`` as in :meth:`prepare`.

        Every pyramid level is queued on the device before the host waits for it, once, to count
        the cells above ``attn_thres``; what follows (NMS of those cells, the result's copy to the
        host) finds the device done. cuDNN does not autotune here (each image brings new pyramid
        shapes); the previous setting comes back afterwards."""
        with cudnn_benchmark(False):
            return self._extract(image, original_size)

    def _extract(self, image: Image.Image | torch.Tensor, original_size: tuple[int, int] | None) -> dict[str, Any]:
        base, size = self.prepare(image, original_size)
        if too_small(*size, self.conf.max_image_size):
            result = self._result(size, *self._nothing(), [np.zeros((0, 0), np.float32)] * len(self.scales))
            if self.global_scales:
                result["global_descriptor"] = np.zeros(self.global_dim, np.float32)
            return result
        attention, boxes, rows, scales, global_descs = [], [], [], [], []
        for scale, with_global in zip(self.scales, self._global_levels):
            x, ratio = self.scale_image(base, scale, size)
            x = x[None].contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.conf.amp and not self.bf16, self.amp_dtype):
                if with_global:
                    fmap, attn, g = self.model.extract_with_global(x)
                    global_descs.append(g[0])
                else:
                    fmap, attn = self.model.extract(x)
            attention.append(attn[0, 0].float())
            boxes.append(cell_boxes(self.receptive_field, *attention[-1].shape, ratio, self.device,
                                    half_pixel=self.conf.boxes == "half_pixel"))
            # (h*w, C) rows of the map: a view for channels_last output; gathered after NMS
            rows.append(fmap[0].permute(1, 2, 0).reshape(-1, fmap.shape[1]))
            scales.append(torch.full((len(rows[-1]),), scale, device=self.device))
        scores = torch.cat([a.flatten() for a in attention])
        selected = int((scores >= self.conf.attn_thres).sum())  # the host waits for the device here
        all_boxes = torch.cat(boxes)
        order = nms_top_k(all_boxes, scores, self.conf.iou_thres, self.conf.top_k, count=selected)
        desc = F.normalize(gather_rows(rows, order), dim=1)
        if self.pca is not None:
            desc = apply_pca(desc, self.pca, self.conf.pca_dims, whiten=self.conf.use_whitening)
        keypoints = box_centres(all_boxes[order])
        # one copy to the host: the selected features, then every attention map
        packed = torch.cat([keypoints, scores[order, None], torch.cat(scales)[order, None], desc], 1)
        host = torch.cat([packed.flatten(), scores]).cpu().numpy()
        packed_np = host[:packed.numel()].reshape(packed.shape)
        maps, start = [], packed.numel()
        for a in attention:
            maps.append(host[start:start + a.numel()].reshape(a.shape))
            start += a.numel()
        result = self._result(size, packed_np[:, :2], packed_np[:, 4:], packed_np[:, 2], packed_np[:, 3], maps)
        if self.global_scales:
            global_descs += [self._global_only(base, g) for g in self._global_only_scales]
            result["global_descriptor"] = pool_scales(global_descs).cpu().numpy()
        return result

    def _global_only(self, base: torch.Tensor, scale: float) -> torch.Tensor:
        """The global descriptor (D,) at a scale that is not a pyramid level: a pass of its own."""
        x, _ = self.scale_image(base, scale, (base.shape[-1], base.shape[-2]))
        with autocast(self.device, self.conf.amp and not self.bf16, self.amp_dtype):
            return self.model.global_descriptor(self.model.features(x[None].contiguous(
                memory_format=torch.channels_last)))[0]

    def _nothing(self) -> tuple[np.ndarray, ...]:
        return (np.zeros((0, 2), np.float32), np.zeros((0, self.descriptor_dim), np.float32),
                np.zeros(0, np.float32), np.zeros(0, np.float32))

    def _result(self, size: tuple[int, int], keypoints: np.ndarray, descriptors: np.ndarray, scores: np.ndarray,
                scales: np.ndarray, attention: list[np.ndarray]) -> dict[str, Any]:
        def np32(a: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(a, dtype=np.float32)

        return {"keypoints": np32(keypoints), "descriptors": np32(descriptors), "scores": np32(scores),
                "scales": np32(scales), "image_size": np.asarray(size, dtype=np.int32), "attention": attention,
                "attention_scales": np.asarray(self.scales, dtype=np.float32)}
