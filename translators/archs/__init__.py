"""Image-to-image architectures, registered by name in :data:`ARCH_REGISTRY`.

Every generator maps ``(N, C_in, H, W)`` float in ``[0, 1]`` to ``(N, C_out, s*H, s*W)`` in ``[0, 1]``
(``s`` is ``scale``, 1 except for super-resolution). Each exposes ``scale`` and ``size_multiple``
(the input side must be a multiple of it) as attributes so callers can validate inputs.
"""

from translators.archs.bicubic_unet import BicubicUNet
from translators.archs.dncnn import DnCNN
from translators.archs.patchgan import PatchGANDiscriminator
from translators.archs.receptive_field import conv_receptive_field, empirical_receptive_field
from translators.archs.registry import ARCH_REGISTRY, build_arch, count_parameters
from translators.archs.resnet import ResnetGenerator
from translators.archs.resunet import ResUNet
from translators.archs.srresnet import SRResNet
from translators.archs.unet import UNetGenerator

__all__ = [
    "ARCH_REGISTRY",
    "BicubicUNet",
    "DnCNN",
    "PatchGANDiscriminator",
    "ResUNet",
    "ResnetGenerator",
    "SRResNet",
    "UNetGenerator",
    "build_arch",
    "conv_receptive_field",
    "count_parameters",
    "empirical_receptive_field",
]
