"""Stage one and the whole two-stage network: a ResNet-encoder U-Net plus a cancer MLP.

Built from MONAI parts: the encoder is MONAI's ``ResNet`` returning its five feature maps (as
``monai.networks.nets.resnet.ResNetEncoder`` does), and the decoder and segmentation head are
the ``UNetDecoder`` and ``SegmentationHead`` of ``monai.networks.nets.FlexibleUNet`` with
FlexibleUNet's defaults; for ResNet50 the network is layer for layer
``FlexibleUNet(in_channels=1, out_channels=1, backbone="resnet50", spatial_dims=2)``.

Why not ``FlexibleUNet`` itself: (1) the classifier needs the encoder's bottleneck from the same
forward pass; (2) MONAI's ``resnet18``/``resnet34`` backbones use the parameter-free "type A"
shortcut, which does not match torchvision's ImageNet weights (they have ``downsample.*``
1x1 convs) and builds the residual from ``out.data``, so no gradient flows through those
shortcuts. Here every depth uses torchvision's layout ("type B" shortcut, no bias), so ImageNet
weights load key for key (see :mod:`lungcad.models.pretrained`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder
from monai.networks.nets.resnet import ResNet
from torch import nn

from lungcad.errors import InputError
from lungcad.models.classifier import MASK_SUMMARY_FEATURES, ClassificationHead, mask_summary
from lungcad.models.forward import forward_logits, sigmoid

#: depth name -> (MONAI block type, blocks per stage); same as torchvision's resnet18/34/50.
RESNET_SPECS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}

#: The encoder downsamples by 2**5; H and W must be multiples of this.
INPUT_DIVISOR = 32


class ResNetEncoder2d(ResNet):
    """2D ResNet encoder in torchvision's parameter layout, returning five feature maps.

    State-dict keys are torchvision's (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``,
    ``layer2.0.downsample.0.weight``, ...) without ``fc.*``.

    Args:
        depth: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        in_channels: input channels (1 for CT).
    """

    def __init__(self, depth: str, in_channels: int = 1) -> None:
        if depth not in RESNET_SPECS:
            raise KeyError(f"unknown ResNet depth {depth!r}; valid: {sorted(RESNET_SPECS)}")
        block, layers = RESNET_SPECS[depth]
        super().__init__(
            block=block,
            layers=list(layers),
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            shortcut_type="B",
            feed_forward=False,
            bias_downsample=False,
        )
        self.depth = depth
        expansion = 4 if block == "bottleneck" else 1
        #: channels of the five feature maps, strides 2, 4, 8, 16, 32.
        self.out_channels: tuple[int, ...] = (64, *(c * expansion for c in (64, 128, 256, 512)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        """Encode.

        Args:
            x: ``(B, C_in, H, W)``.

        Returns:
            Five maps ``(B, out_channels[i], H / 2**(i+1), W / 2**(i+1))``; the last is the
            bottleneck (``layer4``).
        """
        x = self.act(self.bn1(self.conv1(x)))
        features = [x]
        x = self.maxpool(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features


def check_input_shape(x: torch.Tensor, in_channels: int = 1, divisor: int = INPUT_DIVISOR) -> None:
    """Raise a helpful error unless ``x`` is ``(B, in_channels, H, W)`` with H, W % divisor == 0.

    Raises:
        InputError: (a ValueError) naming the shape that came, what is expected and the fix.
    """
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise InputError(
            f"model input must be (batch, {in_channels}, H, W); got shape {tuple(x.shape)}. "
            "Add the batch and channel axes, e.g. image[None, None] for one (H, W) slice."
        )
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h % divisor or w % divisor:
        new_h = (h + divisor - 1) // divisor * divisor
        new_w = (w + divisor - 1) // divisor * divisor
        raise InputError(
            f"model input height and width must be multiples of {divisor} (the encoder "
            f"downsamples {divisor}x); got {h}x{w}. Pad to {new_h}x{new_w} "
            f"(e.g. torch.nn.functional.pad) or resize the slice (preprocessing.resize_slice)."
        )


class LungCADNet(nn.Module):
    """ResNet U-Net for tumour segmentation with an MLP cancer classifier on top.

    Args:
        backbone: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        in_channels: input channels (1: a lung-windowed CT slice in [0, 1]).
        decoder_channels: output channels of the five decoder stages (FlexibleUNet's default).
        decoder_dropout: dropout probability in every decoder convolution block.
        head_hidden: hidden widths of the classifier MLP.
        head_dropout: dropout probability in the classifier MLP.
        detach_mask_summary: if True (default), the mask summary fed to the classifier is
            computed from detached seg logits, so the classification loss never trains the
            decoder. Many training slices have a label but no mask (e.g. IQ-OTH/NCCD); without
            the detach, the classification loss alone would teach the decoder to paint "tumour"
            on every malignant slice, wherever it is. The encoder is still shared by both tasks.
        summary_threshold: probability above which a pixel counts as tumour in the area
            fraction.
        mask_term: give the classifier its direct logistic term on the mask summary
            (:class:`lungcad.models.classifier.ClassificationHead`).

    Attributes:
        cam_target_layer: dotted name of the module to hook for Grad-CAM, the last encoder stage
            ``"encoder.layer4"`` (stride 32); use it with ``monai.visualize.GradCAM`` on
            :class:`ClassLogits` (where it is ``"model.encoder.layer4"``).
    """

    cam_target_layer = "encoder.layer4"

    def __init__(
        self,
        backbone: str = "resnet50",
        in_channels: int = 1,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        decoder_dropout: float = 0.1,
        head_hidden: Sequence[int] = (256, 64),
        head_dropout: float = 0.3,
        detach_mask_summary: bool = True,
        summary_threshold: float = 0.5,
        mask_term: bool = False,
    ) -> None:
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 widths; got {tuple(decoder_channels)}")
        if not 0.0 <= decoder_dropout < 1.0:
            raise ValueError(f"decoder_dropout must be in [0, 1); got {decoder_dropout}")
        self.backbone = backbone
        self.in_channels = in_channels
        self.detach_mask_summary = detach_mask_summary
        self.summary_threshold = summary_threshold
        self._encoder_frozen = False

        self.encoder = ResNetEncoder2d(backbone, in_channels=in_channels)
        # The same arguments FlexibleUNet passes, except is_pad: we require multiples of 32
        # (checked in forward) so padding never silently shifts features by a pixel.
        self.decoder = UNetDecoder(
            spatial_dims=2,
            encoder_channels=(in_channels, *self.encoder.out_channels),
            decoder_channels=tuple(decoder_channels),
            act=("relu", {"inplace": True}),
            norm=("batch", {"eps": 1e-3, "momentum": 0.1}),
            dropout=decoder_dropout,
            bias=False,
            upsample="nontrainable",
            pre_conv="default",
            interp_mode="nearest",
            align_corners=None,
            is_pad=False,
        )
        self.segmentation_head = SegmentationHead(
            spatial_dims=2, in_channels=decoder_channels[-1], out_channels=1, kernel_size=3
        )
        self.classifier = ClassificationHead(
            self.encoder.out_channels[-1],
            hidden=head_hidden,
            dropout=head_dropout,
            n_summary=len(MASK_SUMMARY_FEATURES),
            mask_term=mask_term,
        )

    # ------------------------------------------------------------------ forward passes
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Check the input shape, then return the five encoder maps (ResNetEncoder2d.forward)."""
        if not torch.jit.is_tracing():
            check_input_shape(x, self.in_channels)
        return self.encoder(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last encoder stage ``(B, C, H/32, W/32)`` (C = 512 or 2048), the CAM layer."""
        return self.encode(x)[-1]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Segment and classify a batch of slices.

        Args:
            x: ``(B, 1, H, W)`` float, lung-windowed intensities in [0, 1]; H, W multiples of 32.

        Returns:
            ``{"seg_logits": (B, 1, H, W), "cls_logits": (B,)}`` (logits, not probabilities).
        """
        feats = self.encode(x)
        # FlexibleUNet skips all but the bottleneck: 4 skip connections for 5 feature maps.
        decoded = self.decoder([x, *feats], len(feats) - 1)
        seg_logits = self.segmentation_head(decoded)
        summary_input = seg_logits.detach() if self.detach_mask_summary else seg_logits
        summary = mask_summary(summary_input, self.summary_threshold)
        cls_logits = self.classifier(feats[-1], summary)
        return {"seg_logits": seg_logits, "cls_logits": cls_logits}

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Probabilities for a batch, in eval mode and without autograd.

        Like segmentation_models_pytorch's ``predict``, this switches the model to eval mode
        (and leaves it there) so dropout and batch statistics never leak into predictions.

        Args:
            x: ``(B, 1, H, W)`` as for :meth:`forward`.

        Returns:
            ``{"seg_probs": (B, 1, H, W), "cls_probs": (B,)}`` in [0, 1].
        """
        if self.training:
            self.eval()
        logits = forward_logits(self, x, x.device)
        return {"seg_probs": sigmoid(logits.seg), "cls_probs": sigmoid(logits.cls)}

    # ------------------------------------------------------------------ parameter groups
    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the ResNet encoder (the part pretrained weights go into)."""
        return self.encoder.parameters()

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the U-Net decoder and the segmentation head."""
        yield from self.decoder.parameters()
        yield from self.segmentation_head.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the classification MLP."""
        return self.classifier.parameters()

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the encoder for the warm-up phase of transfer learning.

        Frozen means ``requires_grad=False`` on its parameters and its BatchNorm layers kept in
        eval mode (running statistics fixed, also across later ``model.train()`` calls), so the
        pretrained features are not disturbed by the first, noisy epochs.
        """
        self._encoder_frozen = frozen
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        self.encoder.train(self.training and not frozen)

    @property
    def encoder_frozen(self) -> bool:
        """Whether :meth:`freeze_encoder` is in effect."""
        return self._encoder_frozen

    def train(self, mode: bool = True) -> LungCADNet:
        """As ``nn.Module.train`` but a frozen encoder stays in eval mode."""
        super().train(mode)
        if self._encoder_frozen:
            self.encoder.eval()
        return self


class ClassLogits(nn.Module):
    """View of a :class:`LungCADNet` returning ``(B, 1)`` cancer logits, for MONAI's CAM classes.

    ``monai.visualize.GradCAM`` expects ``model(x)`` to return class scores ``(B, n_classes)``;
    use ``GradCAM(ClassLogits(net), target_layers=ClassLogits.cam_target_layer)`` with
    ``class_idx=0``.
    """

    cam_target_layer = "model." + LungCADNet.cam_target_layer

    def __init__(self, model: LungCADNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` -> ``(B, 1)`` cancer logits."""
        return self.model(x)["cls_logits"].unsqueeze(1)
