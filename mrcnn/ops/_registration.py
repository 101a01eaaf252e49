"""Loads the compiled ops and registers their fake (meta) kernels and autograd.

The kernels and schemas are C++ (mrcnn/ops/csrc); what torch.compile, opcheck and
autograd need beyond that is registered here, once, on import.
"""
from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import urllib.parse
from typing import Optional

import torch


def _installed_extension() -> Optional[str]:
    """Path of the compiled extension of the installed mrcnn-batch distribution.

    `ray job submit --working-dir .` ships the source tree without build outputs (Ray
    honours .gitignore), and that copy shadows the installed package on sys.path: the
    ops then come from the installed build (editable or regular) instead.
    """
    explicit = os.environ.get("MRCNN_EXTENSION")
    if explicit:
        return explicit
    try:
        dist = importlib.metadata.distribution("mrcnn-batch")
    except importlib.metadata.PackageNotFoundError:
        return None
    candidates = [str(dist.locate_file(f)) for f in (dist.files or [])
                  if f.name.startswith("_C.") and f.parent.name == "mrcnn"]
    direct_url = dist.read_text("direct_url.json")
    if direct_url:  # editable install: the library sits in the source tree
        url = json.loads(direct_url).get("url", "")
        if url.startswith("file://"):
            candidates += glob.glob(os.path.join(urllib.parse.unquote(url[7:]), "mrcnn", "_C.*"))
    candidates = [c for c in candidates if os.path.isfile(c) and c.endswith((".so", ".pyd"))]
    return candidates[0] if candidates else None


def _load_extension() -> bool:
    """Registers torch.ops.mrcnn.*; returns whether CUDA kernels were built."""
    try:
        from mrcnn import _C
        return bool(_C.with_cuda)
    except ImportError as exc:
        path = _installed_extension()
        if path is None:
            raise ImportError(
                "mrcnn's compiled RoIAlign extension (mrcnn._C) is missing. Build it with "
                "`bash scripts/bootstrap.sh` or `pip install --no-build-isolation -e .` in an "
                f"environment that has torch, or point MRCNN_EXTENSION at a built _C library. ({exc})"
            ) from exc
        torch.ops.load_library(path)
        return torch._C._dispatch_has_kernel_for_dispatch_key("mrcnn::roi_align", "CUDA")


WITH_CUDA = _load_extension()
ops = torch.ops.mrcnn


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


# ---- fake kernels: output metadata only, so torch.compile can trace ----------

@torch.library.register_fake("mrcnn::roi_align")
def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "rois must be [K, 5]")
    return input.new_empty((rois.size(0), input.size(1), pooled_height, pooled_width))


@torch.library.register_fake("mrcnn::roi_align_backward")
def _roi_align_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size,
                             channels, height, width, sampling_ratio, aligned, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return grad.new_empty((batch_size, channels, height, width)).contiguous(memory_format=fmt)


@torch.library.register_fake("mrcnn::multilevel_roi_align")
def _multilevel_fake(features, rois, levels, spatial_scales, pooled_height, pooled_width,
                     sampling_ratio, aligned):
    return features[0].new_empty((rois.size(0), features[0].size(1), pooled_height, pooled_width))


@torch.library.register_fake("mrcnn::multilevel_roi_align_backward")
def _multilevel_backward_fake(grad, rois, levels, spatial_scales, heights, widths, batch_size,
                              channels, pooled_height, pooled_width, sampling_ratio, aligned,
                              channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [grad.new_empty((batch_size, channels, h, w)).contiguous(memory_format=fmt)
            for h, w in zip(heights, widths)]


@torch.library.register_fake("mrcnn::roi_pool")
def _roi_pool_fake(input, rois, spatial_scale, pooled_height, pooled_width):
    torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "rois must be [K, 5]")
    shape = (rois.size(0), input.size(1), pooled_height, pooled_width)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int32)


@torch.library.register_fake("mrcnn::roi_pool_backward")
def _roi_pool_backward_fake(grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size,
                            channels, height, width):
    return grad.new_empty((batch_size, channels, height, width))


# ---- autograd ------------------------------------------------------------------
# RoIAlign is linear in its input, so the backward op is linear in `grad` and its
# own derivative is the forward op: registering it gives double backward too.

def _roi_align_setup(ctx, inputs, output):
    input, rois, spatial_scale, ph, pw, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, ph, pw, sampling_ratio, aligned)
    ctx.shape = tuple(input.shape)
    ctx.channels_last = _is_channels_last(input)


def _roi_align_grad(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, ph, pw, sampling_ratio, aligned = ctx.args
    n, c, h, w = ctx.shape
    grad_input = ops.roi_align_backward(grad, rois, spatial_scale, ph, pw, n, c, h, w,
                                        sampling_ratio, aligned, ctx.channels_last)
    return grad_input, None, None, None, None, None, None


def _roi_align_backward_setup(ctx, inputs, output):
    grad, rois, spatial_scale, ph, pw, n, c, h, w, sampling_ratio, aligned, channels_last = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, ph, pw, sampling_ratio, aligned)


def _roi_align_backward_grad(ctx, grad_grad_input):
    (rois,) = ctx.saved_tensors
    spatial_scale, ph, pw, sampling_ratio, aligned = ctx.args
    grad_grad = ops.roi_align(grad_grad_input, rois, spatial_scale, ph, pw, sampling_ratio, aligned)
    return (grad_grad,) + (None,) * 11


def _multilevel_setup(ctx, inputs, output):
    features, rois, levels, spatial_scales, ph, pw, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois, levels)
    ctx.args = (list(spatial_scales), ph, pw, sampling_ratio, aligned)
    ctx.heights = [f.size(2) for f in features]
    ctx.widths = [f.size(3) for f in features]
    ctx.batch, ctx.channels = features[0].size(0), features[0].size(1)
    ctx.channels_last = _is_channels_last(features[0])


def _multilevel_grad(ctx, grad):
    rois, levels = ctx.saved_tensors
    spatial_scales, ph, pw, sampling_ratio, aligned = ctx.args
    grads = ops.multilevel_roi_align_backward(
        grad, rois, levels, spatial_scales, ctx.heights, ctx.widths, ctx.batch, ctx.channels,
        ph, pw, sampling_ratio, aligned, ctx.channels_last)
    return list(grads), None, None, None, None, None, None, None


def _multilevel_backward_setup(ctx, inputs, output):
    grad, rois, levels, spatial_scales, heights, widths, n, c, ph, pw, sr, aligned, cl = inputs
    ctx.save_for_backward(rois, levels)
    ctx.args = (list(spatial_scales), ph, pw, sr, aligned)


def _multilevel_backward_grad(ctx, grad_grads):
    rois, levels = ctx.saved_tensors
    spatial_scales, ph, pw, sampling_ratio, aligned = ctx.args
    grad_grad = ops.multilevel_roi_align(list(grad_grads), rois, levels, spatial_scales, ph, pw,
                                         sampling_ratio, aligned)
    return (grad_grad,) + (None,) * 12


def _roi_pool_setup(ctx, inputs, output):
    input, rois, spatial_scale, ph, pw = inputs
    ctx.save_for_backward(rois, output[1])
    ctx.args = (spatial_scale, ph, pw)
    ctx.shape = tuple(input.shape)
    ctx.mark_non_differentiable(output[1])


def _roi_pool_grad(ctx, grad, _grad_argmax):
    # RoIPool's backward scatters grad to the argmax positions; it has no registered derivative of
    # its own (torchvision's has none either): a second backward raises.
    rois, argmax = ctx.saved_tensors
    spatial_scale, ph, pw = ctx.args
    n, c, h, w = ctx.shape
    return ops.roi_pool_backward(grad, rois, argmax, spatial_scale, ph, pw, n, c, h, w), None, None, None, None


torch.library.register_autograd("mrcnn::roi_align", _roi_align_grad, setup_context=_roi_align_setup)
torch.library.register_autograd("mrcnn::roi_pool", _roi_pool_grad, setup_context=_roi_pool_setup)
torch.library.register_autograd("mrcnn::roi_align_backward", _roi_align_backward_grad,
                                setup_context=_roi_align_backward_setup)
torch.library.register_autograd("mrcnn::multilevel_roi_align", _multilevel_grad,
                                setup_context=_multilevel_setup)
torch.library.register_autograd("mrcnn::multilevel_roi_align_backward", _multilevel_backward_grad,
                                setup_context=_multilevel_backward_setup)
