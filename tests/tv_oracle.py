"""Static oracle: number of residual additions in every torchvision model (classification,
quantization, detection, segmentation, video, optical flow).

No tracing, no forward pass: the count is derived from the *module classes* that
torchvision uses and the flags those classes store at construction time.  Every
rule below was read off the ``forward`` of the class in
``torchvision/models/*.py`` (torchvision 0.29.1).

A "residual addition" is an addition ``a + b`` (``+``, ``+=``, ``torch.add`` or
``FloatFunctional.add[_relu]``) executed in a module's own ``forward`` where one
operand is the block input -- or a projection/downsample of it, or the running
residual stream -- and the other is a computed branch.

Public API
----------
expected_residual_adds(model) -> int
residual_blocks(model, include_zero=False) -> dict[str, int]
    qualified module name -> number of residual adds performed by *that* module's
    own forward (the module that owns the ``+``).
residual_block_classes(model) -> dict[str, str]
    qualified module name -> "module.Class" of the owning block (for reporting).

Detection and segmentation models add no residual of their own: their residual blocks are
the classification blocks of their backbone (``backbone.body`` / ``backbone``), and their
FPN, heads and transforms are listed as zero-add classes with the reason.

Classes are matched by class *object* through the MRO (most specific rule wins),
never by class name: torchvision has two classes called ``InvertedResidual``
(mobilenetv2/mobilenetv3 -> conditional residual, shufflenetv2 -> never) and two
called ``MBConv`` (efficientnet -> conditional, maxvit -> always).  Quantizable
subclasses (torchvision.models.quantization) inherit the rule of their float base
class; their forwards perform the same add via ``FloatFunctional``.

The oracle describes torchvision's own ``forward`` implementations; apply it to
the unmodified model (or to a patched model whose blocks keep their class/flags).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

# NB: `from torchvision.models import alexnet` would give the *builder function*
# (torchvision.models.alexnet / googlenet shadow their submodules), so import the
# submodules explicitly.
_tvm = lambda mod: importlib.import_module(f"torchvision.models.{mod}")  # noqa: E731
_alexnet = _tvm("alexnet")
_convnext = _tvm("convnext")
_densenet = _tvm("densenet")
_efficientnet = _tvm("efficientnet")
_googlenet = _tvm("googlenet")
_inception = _tvm("inception")
_maxvit = _tvm("maxvit")
_mnasnet = _tvm("mnasnet")
_mobilenetv2 = _tvm("mobilenetv2")
_mobilenetv3 = _tvm("mobilenetv3")
_regnet = _tvm("regnet")
_resnet = _tvm("resnet")
_shufflenetv2 = _tvm("shufflenetv2")
_squeezenet = _tvm("squeezenet")
_swin = _tvm("swin_transformer")
_vgg = _tvm("vgg")
_vit = _tvm("vision_transformer")
_ops_misc = importlib.import_module("torchvision.ops.misc")
_ops_sd = importlib.import_module("torchvision.ops.stochastic_depth")
_ops_fpn = importlib.import_module("torchvision.ops.feature_pyramid_network")
_ops_poolers = importlib.import_module("torchvision.ops.poolers")
_utils = _tvm("_utils")
_vresnet = _tvm("video.resnet")
_mvit = _tvm("video.mvit")
_s3d = _tvm("video.s3d")
_swin3d = _tvm("video.swin_transformer")
_raft = _tvm("optical_flow.raft")
_det = {
    name: _tvm(f"detection.{name}")
    for name in (
        "anchor_utils", "backbone_utils", "faster_rcnn", "fcos", "keypoint_rcnn", "mask_rcnn",
        "retinanet", "roi_heads", "rpn", "ssd", "ssdlite", "transform",
    )
}  # fmt: skip
_seg = {name: _tvm(f"segmentation.{name}") for name in ("deeplabv3", "fcn", "lraspp")}


def _always(n: int) -> Callable[[nn.Module], int]:
    return lambda m: n


def _if_flag(attr: str) -> Callable[[nn.Module], int]:
    def rule(m: nn.Module) -> int:
        if not hasattr(m, attr):
            raise AttributeError(
                f"{type(m).__qualname__} has no flag {attr!r}; torchvision changed?"
            )
        return 1 if bool(getattr(m, attr)) else 0

    return rule


# class -> rule(module) -> number of residual adds in that class's own forward.
_RULES: dict[type, Callable[[nn.Module], int]] = {
    # resnet.py: `out += identity`, identity = x or self.downsample(x). Always 1.
    _resnet.BasicBlock: _always(1),
    _resnet.Bottleneck: _always(1),
    # mobilenetv2.py: `if self.use_res_connect: return x + self.conv(x)`.
    _mobilenetv2.InvertedResidual: _if_flag("use_res_connect"),
    # mobilenetv3.py: `if self.use_res_connect: result += input`.
    _mobilenetv3.InvertedResidual: _if_flag("use_res_connect"),
    # efficientnet.py: `if self.use_res_connect: result = sd(result); result += input`.
    _efficientnet.MBConv: _if_flag("use_res_connect"),
    _efficientnet.FusedMBConv: _if_flag("use_res_connect"),
    # mnasnet.py: `if self.apply_residual: return self.layers(input) + input`.
    _mnasnet._InvertedResidual: _if_flag("apply_residual"),
    # regnet.py: `x = self.proj(x) + self.f(x)` or `x = x + self.f(x)`. Always 1.
    _regnet.ResBottleneckBlock: _always(1),
    # vision_transformer.py: `x = x + input` and `return x + y`. 2.
    _vit.EncoderBlock: _always(2),
    # swin_transformer.py: two `x = x + self.stochastic_depth(...)` (V1 and V2). 2.
    _swin.SwinTransformerBlock: _always(2),
    _swin.SwinTransformerBlockV2: _always(2),
    # convnext.py: `result += input`. 1.
    _convnext.CNBlock: _always(1),
    # maxvit.py MBConv: `return res + x`, res = self.proj(x) (Identity or AvgPool+Conv). Always 1.
    _maxvit.MBConv: _always(1),
    # maxvit.py PartitionAttentionLayer: two `x = x + self.stochastic_dropout(...)`. 2.
    _maxvit.PartitionAttentionLayer: _always(2),
    # video/resnet.py: `out += residual`, residual = x or self.downsample(x). Always 1.
    _vresnet.BasicBlock: _always(1),
    _vresnet.Bottleneck: _always(1),
    # video/mvit.py MultiscaleBlock: `x = x_skip + self.stochastic_depth(x_attn)` and
    # `return x_proj + self.stochastic_depth(self.mlp(x_norm2))`. 2.
    _mvit.MultiscaleBlock: _always(2),
    # video/swin_transformer.py builds 2-D swin_transformer.SwinTransformerBlock (rule above)
    # with ShiftedWindowAttention3d.
    # optical_flow/raft.py ResidualBlock / BottleneckBlock: `return self.relu(x + y)`,
    # x = input or self.downsample(input). Always 1.
    _raft.ResidualBlock: _always(1),
    _raft.BottleneckBlock: _always(1),
}

# Classes verified to own no residual add in their forward (documentation +
# strict-mode bookkeeping).  Adds that exist in some of them are NOT residual:
#   vision_transformer.Encoder: `input + self.pos_embedding` (positional embedding)
#   maxvit.RelativePositionalMultiHeadAttention: `dot_prod + pos_bias` (attn bias)
#   swin ShiftedWindowAttention(V2) -> shifted_window_attention():
#       `attn + relative_position_bias`, `attn + attn_mask` (attn bias / mask)
#   googlenet.GoogLeNet / inception.Inception3 `_transform_input`: tensor*c + c
#       (scalar affine normalisation, only when transform_input=True)
_ZERO = {
    _alexnet.AlexNet,
    _vgg.VGG,
    _squeezenet.SqueezeNet,
    _squeezenet.Fire,  # Fire: torch.cat
    _densenet.DenseNet,
    _densenet._DenseBlock,
    _densenet._DenseLayer,
    _densenet._Transition,  # torch.cat
    _shufflenetv2.ShuffleNetV2,
    _shufflenetv2.InvertedResidual,  # torch.cat + channel_shuffle
    _googlenet.GoogLeNet,
    _googlenet.Inception,
    _googlenet.InceptionAux,
    _googlenet.BasicConv2d,
    _inception.Inception3,
    _inception.InceptionA,
    _inception.InceptionB,
    _inception.InceptionC,
    _inception.InceptionD,
    _inception.InceptionE,
    _inception.InceptionAux,
    _inception.BasicConv2d,
    _resnet.ResNet,
    _mobilenetv2.MobileNetV2,
    _mobilenetv3.MobileNetV3,
    _efficientnet.EfficientNet,
    _mnasnet.MNASNet,
    _regnet.RegNet,
    _regnet.AnyStage,
    _regnet.BottleneckTransform,
    _regnet.SimpleStemIN,
    _vit.VisionTransformer,
    _vit.Encoder,
    _vit.MLPBlock,
    _swin.SwinTransformer,
    _swin.ShiftedWindowAttention,
    _swin.ShiftedWindowAttentionV2,
    _swin.PatchMerging,
    _swin.PatchMergingV2,
    _convnext.ConvNeXt,
    _convnext.LayerNorm2d,
    _maxvit.MaxVit,
    _maxvit.MaxVitBlock,
    _maxvit.MaxVitLayer,
    _maxvit.RelativePositionalMultiHeadAttention,
    _maxvit.SwapAxes,
    _maxvit.WindowPartition,
    _maxvit.WindowDepartition,
    # torchvision.ops building blocks (subclassed by torchvision.models.quantization)
    _ops_misc.Conv2dNormActivation,
    _ops_misc.SqueezeExcitation,
    _ops_misc.MLP,
    _ops_misc.Permute,
    _ops_sd.StochasticDepth,
    _ops_misc.Conv3dNormActivation,
    _ops_misc.FrozenBatchNorm2d,  # `x * scale + bias`: a per-channel affine
    # ---- video
    _vresnet.VideoResNet,
    _vresnet.BasicStem,
    _vresnet.R2Plus1dStem,
    _vresnet.Conv3DSimple,
    _vresnet.Conv2Plus1D,
    _vresnet.Conv3DNoTemporal,
    _mvit.MViT,
    _mvit.PositionalEncoding,  # `x.add_(pos_embedding)`: positional embedding
    _mvit.Pool,
    # MultiscaleAttention: `attn + rel_pos` (bias), and MViTv2's pooling residual
    # `x += q` (residual_pool): a skip inside the attention with no stochastic-depth slot;
    # torchvision drops only the block's two residuals, and native slots define the sites.
    _mvit.MultiscaleAttention,
    _s3d.S3D,
    _s3d.SepInceptionBlock3D,  # torch.cat
    _s3d.TemporalSeparableConv,
    _swin3d.SwinTransformer3d,
    _swin3d.PatchEmbed3d,
    _swin3d.ShiftedWindowAttention3d,  # `attn + relative_position_bias`, `attn + attn_mask`
    # ---- optical flow
    _raft.RAFT,  # `coords1 = coords1 + delta_flow`: the flow estimate's iterative update
    _raft.FeatureEncoder,
    _raft.MotionEncoder,  # torch.cat
    # ConvGRU: `h = (1 - z) * h + z * q` is a gated interpolation (a GRU update): dropping
    # `z * q` leaves `(1 - z) * h`, not the input. Not a residual branch.
    _raft.ConvGRU,
    _raft.RecurrentBlock,
    _raft.FlowHead,
    _raft.UpdateBlock,
    _raft.MaskPredictor,
    _raft.CorrBlock,  # `centroids_coords + delta`: coordinates
    # ---- detection: residual blocks live in the backbone (classification classes above)
    _utils.IntermediateLayerGetter,
    _ops_fpn.FeaturePyramidNetwork,  # `inner_lateral + inner_top_down`: top-down merge of two maps
    _ops_fpn.LastLevelMaxPool,
    _ops_fpn.LastLevelP6P7,
    _ops_poolers.MultiScaleRoIAlign,
    _det["anchor_utils"].AnchorGenerator,
    _det["anchor_utils"].DefaultBoxGenerator,
    _det["backbone_utils"].BackboneWithFPN,
    _det["transform"].GeneralizedRCNNTransform,
    _det["rpn"].RPNHead,
    _det["rpn"].RegionProposalNetwork,  # box decoding arithmetic
    _det["roi_heads"].RoIHeads,  # box and keypoint arithmetic
    _det["faster_rcnn"].FasterRCNN,
    _det["faster_rcnn"].TwoMLPHead,
    _det["faster_rcnn"].FastRCNNConvFCHead,
    _det["faster_rcnn"].FastRCNNPredictor,
    _det["mask_rcnn"].MaskRCNN,
    _det["mask_rcnn"].MaskRCNNHeads,
    _det["mask_rcnn"].MaskRCNNPredictor,
    _det["keypoint_rcnn"].KeypointRCNN,
    _det["keypoint_rcnn"].KeypointRCNNHeads,
    _det["keypoint_rcnn"].KeypointRCNNPredictor,
    _det["retinanet"].RetinaNet,
    _det["retinanet"].RetinaNetHead,
    _det["retinanet"].RetinaNetClassificationHead,
    _det["retinanet"].RetinaNetRegressionHead,
    _det["fcos"].FCOS,
    _det["fcos"].FCOSHead,
    _det["fcos"].FCOSClassificationHead,
    _det["fcos"].FCOSRegressionHead,
    _det["ssd"].SSD,
    _det["ssd"].SSDHead,
    _det["ssd"].SSDClassificationHead,
    _det["ssd"].SSDRegressionHead,
    _det["ssd"].SSDFeatureExtractorVGG,
    _det["ssdlite"].SSDLiteHead,
    _det["ssdlite"].SSDLiteClassificationHead,
    _det["ssdlite"].SSDLiteRegressionHead,
    _det["ssdlite"].SSDLiteFeatureExtractorMobileNet,
    # ---- segmentation
    _seg["deeplabv3"].DeepLabV3,
    _seg["deeplabv3"].DeepLabHead,
    _seg["deeplabv3"].ASPP,  # torch.cat
    _seg["deeplabv3"].ASPPConv,
    _seg["deeplabv3"].ASPPPooling,
    _seg["fcn"].FCN,
    _seg["fcn"].FCNHead,
    _seg["lraspp"].LRASPP,
    _seg["lraspp"].LRASPPHead,  # `low_classifier(low) + high_classifier(x)`: two heads' sum
}


def _rule_for(m: nn.Module) -> Callable[[nn.Module], int] | None:
    for cls in type(m).__mro__:
        if cls in _RULES:
            return _RULES[cls]
        if cls in _ZERO:
            return None
    return None


def _known(m: nn.Module) -> bool:
    return any(c in _RULES or c in _ZERO for c in type(m).__mro__)


def count_for_module(m: nn.Module) -> int:
    """Residual adds owned by ``m``'s own forward (children not included)."""
    rule = _rule_for(m)
    return 0 if rule is None else rule(m)


def residual_blocks(
    model: nn.Module, include_zero: bool = False, strict: bool = False
) -> dict[str, int]:
    """Qualified module name -> residual adds in that module's own forward.

    include_zero: also list recognised residual-block classes whose flag is off
        (e.g. MobileNetV2 InvertedResidual with use_res_connect=False) with 0.
    strict: raise if a module whose class is defined under ``torchvision.models``
        is neither a known residual block nor a verified zero-add class (guards
        against torchvision adding a new block type).
    """
    out: dict[str, int] = {}
    for name, m in model.named_modules():
        if strict and type(m).__module__.startswith("torchvision.") and not _known(m):
            raise KeyError(
                f"unclassified torchvision class {type(m).__module__}.{type(m).__qualname__} at {name!r}"
            )
        rule = _rule_for(m)
        if rule is None:
            continue
        n = rule(m)
        if n or include_zero:
            out[name] = n
    return out


def residual_block_classes(model: nn.Module) -> dict[str, str]:
    return {
        name: f"{type(m).__module__.rsplit('.', 1)[-1]}.{type(m).__qualname__}"
        for name, m in model.named_modules()
        if _rule_for(m) is not None and count_for_module(m) > 0
    }


def expected_residual_adds(model: nn.Module, strict: bool = False) -> int:
    """Total number of residual additions executed by one forward of ``model``."""
    return sum(residual_blocks(model, strict=strict).values())


__all__ = [
    "count_for_module",
    "expected_residual_adds",
    "residual_block_classes",
    "residual_blocks",
]
