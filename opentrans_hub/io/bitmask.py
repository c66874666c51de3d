"""Keep-mask bits on disk: a bool tensor as packed bits, or zstd over those bits, and back.

``packbits`` stores one bit per weight, row-major, the last byte padded with zero bits; ``zstd`` compresses
those bytes (level 19, content size in the frame). Decoding is bounded: :meth:`BitCodec.check_stored` compares
what the shape needs with the stored bytes before anything is decoded (``packbits``: exactly; ``zstd``: the
frame's declared content size, and at most 32768 bytes out per byte in, the most a zstd frame can give), and the
inflated stream stops one byte past what the shape needs, so a lying or exploding frame is refused, not
decompressed. Subnetwork files and packed checkpoints share this codec.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import OpenTransError
from .limits import out_of_memory

ENCODINGS = ("packbits", "zstd")
ZSTD_LEVEL = 19
MAX_WEIGHTS = 1 << 34  # per tensor: 17G weights, 2 GiB of bits; far beyond any CLIP layer
#: the most bytes one byte of zstd frame can inflate to: every block has a 3-byte header and at least one byte of
#: content (an RLE block), and gives at most 128 KiB
MAX_ZSTD_RATIO = 128 * 1024 // 4


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

    def check_stored(self, raw: bytes | memoryview, shape: tuple[int, ...], source: str, tensor: str) -> int:
        """Check, without decoding, that ``raw`` can hold the bits of a tensor of ``shape``; returns their byte
        count. Cheap (a zstd frame's header at most), so readers run it on every mask before decoding any."""
        numel = 1
        for dim in shape:
            numel *= dim
        if numel > MAX_WEIGHTS:
            raise OpenTransError(f"shape {list(shape)} holds {numel} weights, more than any real layer", path=source,
                                 tensor=tensor)
        nbytes = (numel + 7) // 8
        if self.encoding == "packbits":
            if len(raw) != nbytes:
                raise OpenTransError(f"{len(raw)} bytes of bits for shape {list(shape)} ({numel} weights need "
                                     f"{nbytes})", path=source, tensor=tensor)
            return nbytes
        import zstandard

        try:
            declared = zstandard.frame_content_size(bytes(raw[:18]))  # a frame header is at most 18 bytes
        except zstandard.ZstdError as exc:
            raise OpenTransError(f"corrupted zstd stream ({exc})", path=source, tensor=tensor) from None
        if declared >= 0 and declared != nbytes:  # refuse before allocating what the frame claims
            raise OpenTransError(f"zstd frame holds {declared} bytes, the shape needs {nbytes}", path=source,
                                 tensor=tensor)
        if nbytes > MAX_ZSTD_RATIO * len(raw):
            raise OpenTransError(f"a zstd frame of {len(raw)} bytes cannot hold the {nbytes} bytes of bits shape "
                                 f"{list(shape)} needs", path=source, tensor=tensor)
        return nbytes

    def decode(self, raw: bytes | memoryview, shape: tuple[int, ...], source: str, tensor: str) -> np.ndarray:
        """The flat bool keep-mask of a tensor of ``shape`` from its stored bytes; any defect raises. It allocates
        one byte per weight: callers check the total against the decode limit first."""
        nbytes = self.check_stored(raw, shape, source, tensor)
        numel = 1
        for dim in shape:
            numel *= dim
        try:
            if self.encoding == "zstd":
                raw = self._inflate(raw, nbytes, source, tensor)
            if len(raw) != nbytes:
                raise OpenTransError(f"{len(raw)} bytes of bits for shape {list(shape)} ({numel} weights need "
                                     f"{nbytes})", path=source, tensor=tensor)
            bits = np.frombuffer(raw, dtype=np.uint8)
            if numel % 8 and nbytes and bits[-1] & ((1 << (8 - numel % 8)) - 1):
                raise OpenTransError("padding bits are not zero (corrupted or not canonical)", path=source,
                                     tensor=tensor)
            return np.unpackbits(bits, count=numel).astype(bool, copy=False)
        except MemoryError:
            raise out_of_memory(numel + nbytes, "decoding mask bits", source, tensor) from None

    def _inflate(self, raw: bytes | memoryview, nbytes: int, source: str, tensor: str) -> bytes | bytearray:
        """One zstd frame, into a buffer of ``nbytes`` (one byte more is read to catch a frame that gives more)."""
        import zstandard

        out = bytearray(nbytes + 1)
        view, total = memoryview(out), 0
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(bytes(raw))
            while total <= nbytes:
                got = reader.readinto(view[total:total + min(1 << 20, nbytes + 1 - total)])
                if not got:
                    break
                total += got
        except zstandard.ZstdError as exc:
            raise OpenTransError(f"corrupted zstd stream ({exc})", path=source, tensor=tensor) from None
        finally:
            view.release()
        if total > nbytes:
            raise OpenTransError(f"zstd stream inflates beyond the {nbytes} bytes its shape needs", path=source,
                                 tensor=tensor)
        del out[total:]
        return out
