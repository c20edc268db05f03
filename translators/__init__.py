"""Shared core of Heist: architectures, checkpoints, image codecs, the photo corpus and the victim zoo.

Everything else imports this package; it imports none of them. Images inside the code are float
tensors shaped ``(N, 3, H, W)`` with values in ``[0, 1]``; uint8 appears only at the codec boundary.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
