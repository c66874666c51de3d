"""Keep-mask bits on disk: a bool tensor as packed bits, or zstd over those bits, and back.

``packbits`` stores one bit per weight, row-major, the last byte padded with zero bits; ``zstd`` compresses
those bytes (level 19, content size in the frame). Decoding is bounded: the frame's declared size and the
inflated stream are checked against what the shape needs before anything larger is allocated, so a lying or
exploding frame is refused, not decompressed. Subnetwork files and packed checkpoints share this codec.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import OpenTransError

ENCODINGS = ("packbits", "zstd")
ZSTD_LEVEL = 19
MAX_WEIGHTS = 1 << 34  # per tensor: 17G weights, 2 GiB of bits; far beyond any CLIP layer


def pack_bits(mask: torch.Tensor) -> bytes:
    """A bool tensor's bits, row-major, 8 to a byte, the last byte padded with zeros."""
    return np.packbits(mask.reshape(-1).numpy()).tobytes()


def check_encoding(encoding: object, source: str | None = None) -> str:
    if encoding not in ENCODINGS:
        raise OpenTransError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}", path=source)
    return encoding  # type: ignore[return-value]


class BitCodec:
    """Encode and decode mask bits in one encoding (the zstd (de)compressor is made once and reused)."""

    def __init__(self, encoding: str, source: str | None = None):
        self.encoding = check_encoding(encoding, source)
        self._zstd = None

    def encode(self, mask: torch.Tensor) -> bytes:
        """The stored bytes of a bool mask."""
        packed = pack_bits(mask)
        if self.encoding == "packbits":
            return packed
        if self._zstd is None:
            import zstandard

            self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
        return self._zstd.compress(packed)

    def decode(self, raw: bytes | memoryview, shape: tuple[int, ...], source: str, tensor: str) -> np.ndarray:
        """The flat bool keep-mask of a tensor of ``shape`` from its stored bytes; any defect raises."""
        numel = 1
        for dim in shape:
            numel *= dim
        if numel > MAX_WEIGHTS:
            raise OpenTransError(f"shape {list(shape)} holds {numel} weights, more than any real layer", path=source,
                                 tensor=tensor)
        nbytes = (numel + 7) // 8
        if self.encoding == "zstd":
            raw = self._inflate(raw, nbytes, source, tensor)
        if len(raw) != nbytes:
            raise OpenTransError(f"{len(raw)} bytes of bits for shape {list(shape)} ({numel} weights need {nbytes})",
                                 path=source, tensor=tensor)
        bits = np.frombuffer(raw, dtype=np.uint8)
        if numel % 8 and nbytes and bits[-1] & ((1 << (8 - numel % 8)) - 1):
            raise OpenTransError("padding bits are not zero (corrupted or not canonical)", path=source, tensor=tensor)
        return np.unpackbits(bits, count=numel).astype(bool, copy=False)

    def _inflate(self, raw: bytes | memoryview, nbytes: int, source: str, tensor: str) -> bytes:
        """One zstd frame, never holding more than ``nbytes + 1`` bytes (bombs, lying frames)."""
        import zstandard

        try:
            declared = zstandard.frame_content_size(raw)
            if declared >= 0 and declared != nbytes:  # refuse before allocating what the frame claims
                raise OpenTransError(f"zstd frame holds {declared} bytes, the shape needs {nbytes}", path=source,
                                     tensor=tensor)
            reader = zstandard.ZstdDecompressor().stream_reader(bytes(raw))
            chunks, total = [], 0
            while True:
                chunk = reader.read(min(1 << 20, nbytes + 1 - total))
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
                total += len(chunk)
                if total > nbytes:
                    raise OpenTransError(f"zstd stream inflates beyond the {nbytes} bytes its shape needs",
                                         path=source, tensor=tensor)
        except zstandard.ZstdError as exc:
            raise OpenTransError(f"corrupted zstd stream ({exc})", path=source, tensor=tensor) from None
