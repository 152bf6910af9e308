"""The published recipes, each with the file its numbers come from."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from dpatch.recipes._records import Recipe, SizeRate, Source, TimeSchedule

__all__ = ["RECIPES"]


# --------------------------------------------------------------------------- sources
_DEIT = Source(
    "Touvron et al. 2021, Training data-efficient image transformers & distillation "
    "through attention (ICML, arXiv:2012.12877)",
    "https://github.com/facebookresearch/deit/blob/main/main.py",
    "--drop-path default 0.1 for every DeiT; timm's VisionTransformer spreads it "
    "linearly over the blocks",
)
_DEIT3 = Source(
    "Touvron, Cord & Jegou 2022, DeiT III: Revenge of the ViT (ECCV, arXiv:2204.07118)",
    "https://github.com/facebookresearch/deit/blob/main/README_revenge.md",
    "--drop-path of the training commands per size; models_v2.py gives every block the same rate",
)
_CONVNEXT = Source(
    "Liu et al. 2022, A ConvNet for the 2020s (CVPR, arXiv:2201.03545)",
    "https://github.com/facebookresearch/ConvNeXt/blob/main/TRAINING.md",
    "--drop_path of the training commands; models/convnext.py spreads it linearly over all blocks",
)
_SWIN = Source(
    "Liu et al. 2021, Swin Transformer: Hierarchical Vision Transformer using Shifted "
    "Windows (ICCV, arXiv:2103.14030)",
    "https://github.com/microsoft/Swin-Transformer/blob/main/configs/swin/"
    "swin_tiny_patch4_window7_224.yaml",
    "DROP_PATH_RATE of configs/swin/swin_{tiny,small,base}_patch4_window7_224.yaml; "
    "spread linearly over all blocks",
)
_DINOV2 = Source(
    "Oquab et al. 2023, DINOv2: Learning Robust Visual Features without Supervision "
    "(TMLR, arXiv:2304.07193)",
    "https://github.com/facebookresearch/dinov2/blob/main/dinov2/configs/ssl_default_config.yaml",
    "drop_path_rate 0.3 and drop_path_uniform in the default config; 0.4 in "
    "configs/train/vitl14.yaml and vitg14.yaml; blocks compute the branch on a subset "
    "of the batch above rate 0.1",
)
_HUANG = Source(
    "Huang et al. 2016, Deep Networks with Stochastic Depth (ECCV, arXiv:1603.09382)",
    "https://github.com/yueatsprograms/Stochastic_Depth/blob/master/ResidualDrop.lua",
    "linear decay rule to p_L = 0.5 for 110-layer ResNets on CIFAR; a gate per "
    "mini-batch; eval multiplies the branch by its survival probability",
)
_LIU = Source(
    "Liu et al. 2023, Dropout Reduces Underfitting (ICML, arXiv:2303.01500)",
    "https://github.com/facebookresearch/dropout/blob/main/README.md",
    "--drop_path, --drop_mode, --drop_schedule, --cutoff_epoch of the basic-recipe "
    "commands; drop_scheduler.py gives the rate per iteration",
)
_COMPOSER = Source(
    "MosaicML Composer, Stochastic Depth (Block) method card, after Huang et al. 2016",
    "https://github.com/mosaicml/composer/blob/dev/docs/source/method_cards/stochastic_depth.md",
    "drop_rate 0.2 (ResNet-50) / 0.4 (ResNet-101), drop_distribution 'linear' = "
    "(i + 1) / N * rate in stochastic_depth.py, drop_warmup 0, same blocks on every GPU",
)
_LAYERSKIP = Source(
    "Elhoushi et al. 2024, LayerSkip: Enabling Early Exit Inference and Self-Speculative "
    "Decoding (ACL, arXiv:2404.16710)",
    "https://github.com/pytorch/torchtune/blob/main/recipes/dev/7B_full_early_exit.yaml",
    "the LayerSkip (TOPv2) command of this torchtune config: layer_dropout.prob=0.2 with the "
    "exp layer scale; torchtune/modules/layer_dropout.py: rate p_max * (e^(l ln2/(L-1)) - 1) "
    "for layer l of L, a Bernoulli draw per sample, kept layers not rescaled",
)

# Sizes recognised by (residual blocks, width of the first block).
_VIT = {"S": (12, 384), "B": (12, 768), "L": (24, 1024), "H": (32, 1280), "g": (40, 1536)}
_CONVNEXT_SIZES = {"T": (18, 96), "S": (36, 96), "B": (36, 128), "L": (36, 192), "XL": (36, 256)}
_SWIN_SIZES = {"T": (12, 96), "S": (24, 96), "B": (24, 128)}
_RESNET = {"50": (16, None), "101": (33, None)}


def _sizes(table: Mapping[str, tuple[int, int | None]], **rates: float) -> tuple[SizeRate, ...]:
    return tuple(SizeRate(s, rate, *table[s]) for s, rate in rates.items())


_RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "deit",
        "DeiT-Ti/S/B on ImageNet-1k",
        "linear",
        _DEIT,
        max_rate=0.1,
    ),
    Recipe(
        "deit3-in1k",
        "DeiT III ViT-S/B/L/H, ImageNet-1k training",
        "uniform",
        _DEIT3,
        sizes=_sizes(_VIT, S=0.05, B=0.2, L=0.45, H=0.6),
    ),
    Recipe(
        "deit3-in21k",
        "DeiT III ViT-S/B/L/H, ImageNet-21k pre-training",
        "uniform",
        _DEIT3,
        sizes=_sizes(_VIT, S=0.05, B=0.1, L=0.3, H=0.5),
    ),
    Recipe(
        "deit3-in21k-ft",
        "DeiT III ViT-S/B/L/H, ImageNet-1k fine-tuning after 21k pre-training",
        "uniform",
        _DEIT3,
        sizes=_sizes(_VIT, S=0.05, B=0.15, L=0.4, H=0.45),
    ),
    Recipe(
        "convnext-in1k",
        "ConvNeXt-T/S/B/L, ImageNet-1k training",
        "linear",
        _CONVNEXT,
        sizes=_sizes(_CONVNEXT_SIZES, T=0.1, S=0.4, B=0.5, L=0.5),
    ),
    Recipe(
        "convnext-in22k",
        "ConvNeXt-B/L/XL, ImageNet-22k pre-training",
        "linear",
        _CONVNEXT,
        sizes=_sizes(_CONVNEXT_SIZES, B=0.1, L=0.1, XL=0.2),
    ),
    Recipe(
        "convnext-in22k-ft",
        "ConvNeXt-B/L/XL, ImageNet-1k fine-tuning (224 px) after 22k pre-training",
        "linear",
        _CONVNEXT,
        sizes=_sizes(_CONVNEXT_SIZES, B=0.2, L=0.3, XL=0.4),
    ),
    Recipe(
        "swin",
        "Swin-T/S/B, ImageNet-1k training (224 px, window 7)",
        "linear",
        _SWIN,
        sizes=_sizes(_SWIN_SIZES, T=0.2, S=0.3, B=0.5),
    ),
    Recipe(
        "dinov2",
        "DINOv2 self-supervised ViT pre-training (S/B: default config, L/g: train configs)",
        "uniform",
        _DINOV2,
        sizes=_sizes(_VIT, S=0.3, B=0.3, L=0.4, g=0.4),
        skip=True,
        notes="DINOv2 computes a dropped residual only on the kept samples (skip=True); "
        "its released ViT-S/B were distilled from ViT-g, so their 0.3 is the "
        "default config's, not a published run's",
    ),
    Recipe(
        "huang-cifar",
        "ResNet-110 on CIFAR-10/100 (Huang et al.'s stochastic depth)",
        "huang",
        _HUANG,
        max_rate=0.5,
        mode="batch",
        scaling="expected",
    ),
    Recipe(
        "early-sd-vit-t",
        "ViT-T, early stochastic depth, ImageNet-1k basic recipe (300 epochs)",
        "linear",
        _LIU,
        max_rate=0.5,
        time=TimeSchedule("early", "linear", cutoff_epochs=50, epochs=300),
        notes="early stochastic depth uses --drop_path 0.5; the 0.1 of the same README is "
        "early *dropout*, which dpatch does not do. With the improved recipe (600 epochs) "
        "the cutoff stays at epoch 50",
    ),
    Recipe(
        "late-sd-vit-b",
        "ViT-B, late stochastic depth, ImageNet-1k basic recipe (300 epochs)",
        "linear",
        _LIU,
        max_rate=0.4,
        time=TimeSchedule("late", cutoff_epochs=50, epochs=300),
    ),
    Recipe(
        "composer-resnet",
        "ResNet-50/101 on ImageNet, block-wise stochastic depth (Composer)",
        "huang",
        _COMPOSER,
        sizes=_sizes(_RESNET, **{"50": 0.2, "101": 0.4}),
        mode="batch",
        scaling="expected",
        notes="Composer's suggested hyperparameters use no drop warm-up (drop_warmup=0); "
        "add one with DropPathScheduler(kind='warmup') if wanted",
    ),
    Recipe(
        "layerskip",
        "decoder LLMs (Llama), LayerSkip layer dropout rising over depth and training",
        "exponential",
        _LAYERSKIP,
        max_rate=0.2,
        scaling="none",
        tie="block",
        time=TimeSchedule("exp-ramp"),
        notes="p_max 0.2 is torchtune's command reproducing LayerSkip on TOPv2; the paper's "
        "p_max per experiment could not be checked against the paper itself here. The time "
        "curriculum S(t) = e^(t ln2/T) - 1 over the run (exp-ramp) is the paper's for "
        "pre-training from scratch as reported in summaries of the paper (not verified "
        "against its text); for continual pre-training and fine-tuning its S(t) is 1: pass "
        "kind='constant'. torchtune itself has no curriculum yet. LayerSkip drops a whole "
        "layer per sample, as tie='block' does here (with skip=True the layer runs on the kept "
        "rows only, like torchtune's index_select). LayerSkip's early-exit loss is not part "
        "of dpatch",
    ),
)

RECIPES: Mapping[str, Recipe] = MappingProxyType({r.name: r for r in _RECIPES})
