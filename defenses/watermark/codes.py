"""Payloads of the client-traceable watermark: a keyed 32-bit client id and its error-correcting code.

The id of a client is the first 32 bits of ``HMAC-SHA256(secret, "heist-trace-id:" + client)``: without the
server secret nobody can tell which id belongs to which client, and the server maps a decoded id back to a
name by recomputing the ids of the clients it knows (static keys and the key store).

Error correction: each 4-bit nibble of the id is coded with Hamming(7,4) (minimum distance 3), so the 32-bit
id becomes 56 code bits. Decoding is soft maximum-likelihood per 7-bit block (the codeword of 16 whose ±1
form correlates best with the soft values), which corrects any single hard error per block and more
when the soft values say which bits are unreliable.

False-match probability: for an image that carries no payload of ours, the 56 hard code bits are modelled as
independent fair coins (checked on clean photos by ``bench/watermark.py``), so the chance that a candidate
codeword lies within Hamming distance ``d`` is the binomial tail ``P(Bin(56, 1/2) <= d)``; with ``n``
candidates, the union bound multiplies it by ``n``.
"""

from __future__ import annotations

import hashlib
import hmac
import math

import torch

ID_BITS = 32
CODE_BITS = 56  # 8 nibbles x Hamming(7,4)

# Hamming(7,4) generator (systematic: the 4 data bits first, then 3 parity bits).
_G = torch.tensor(
    [[1, 0, 0, 0, 1, 1, 0], [0, 1, 0, 0, 1, 0, 1], [0, 0, 1, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1]], dtype=torch.int64
)
_NIBBLES = torch.tensor([[(v >> (3 - k)) & 1 for k in range(4)] for v in range(16)], dtype=torch.int64)
_CODEWORDS = (_NIBBLES @ _G) % 2  # (16, 7)
_CODEWORDS_PM = _CODEWORDS.float() * 2 - 1


def client_id(secret: int, client: str) -> int:
    """The 32-bit id of ``client`` under the server ``secret`` (HMAC-SHA256, first 4 bytes, big-endian)."""
    key = int(secret).to_bytes(8, "big", signed=False)
    digest = hmac.new(key, b"heist-trace-id:" + client.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:4], "big")


def id_bits(value: int) -> torch.Tensor:
    """``value`` as 32 bits (int64 0/1, most significant first)."""
    return torch.tensor([(value >> (ID_BITS - 1 - k)) & 1 for k in range(ID_BITS)], dtype=torch.int64)


def bits_to_id(bits: torch.Tensor) -> int:
    """Inverse of :func:`id_bits`."""
    out = 0
    for b in bits.tolist():
        out = (out << 1) | int(b)
    return out


def encode(value: int) -> torch.Tensor:
    """32-bit id -> 56 code bits (int64 0/1): Hamming(7,4) on each nibble."""
    nib = id_bits(value).view(8, 4)
    return ((nib @ _G) % 2).reshape(-1)


def decode_soft(soft: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Soft values ``(56,)`` (positive = bit 1) -> (decoded 32-bit id, the 56 code bits of that id).

    Maximum-likelihood per Hamming block: ``argmax_c <c, soft_block>`` over the 16 codewords.
    """
    blocks = soft.float().view(8, 7)
    best = (blocks @ _CODEWORDS_PM.T).argmax(dim=1)  # (8,)
    nibbles = _NIBBLES[best].reshape(-1)
    return bits_to_id(nibbles), _CODEWORDS[best].reshape(-1)


def binomial_tail(n: int, d: int) -> float:
    """``P(Bin(n, 1/2) <= d)``: chance that ``n`` fair coins agree with a fixed word in ``n - d`` places or more."""
    if d < 0:
        return 0.0
    return min(1.0, sum(math.comb(n, k) for k in range(min(d, n) + 1)) / 2.0**n)
