"""What the runtime accepts, and the memory bound those limits are chosen to meet."""

from __future__ import annotations

from .errors import InputError

# The memory bound: peak RSS of the runtime process (engine and model loaded) classifying any
# input it accepts, so a 1 GB Pi-class board keeps room for the rest. The limits below are chosen
# to meet it (benchmarks.memory.limit_input makes the largest accepted input of each kind).
MEMORY_BOUND_MB = 256
# 4,320 x 4,320 (18.7 M pixels): the largest chest detectors (43 cm CR/DX panels at 100 um,
# ~4,300 x 4,300) fit; a CT slice is 512 x 512. A 16-bit PNG costs ~6 bytes a pixel (source +
# float32 gray), an uncompressed DICOM ~8 (file bytes + pixels + float32 gray): at this limit the
# worst accepted input stays under MEMORY_BOUND_MB with either engine. Larger is refused as a bomb.
MAX_PIXELS = 4_320 * 4_320
# Pillow's decoders spend time and memory per row: a 72-byte PNG claiming 1 x 64,000,000 pixels
# took 5 s and 1.3 GB (found by tools/fuzz/). No scan is anywhere near this long on one side.
MAX_SIDE = 16_384
# The whole file is read into memory: an uncompressed 16-bit DICOM at MAX_PIXELS is 37 MB.
MAX_FILE_BYTES = 64 * 1024 * 1024
STRIP_ROWS = 256  # rows converted to gray at a time: no whole-image temporaries
# Every scan of a progressive JPEG walks the whole image again: 20,000 copies of one small scan
# (753 kB) took 29 s, and the cost grows with the count, not the pixels. libjpeg's own progressive
# scripts use 6-10 scans; an EXIF thumbnail adds its own.
MAX_JPEG_SCANS = 100
# Text chunks Pillow keeps from a PNG (its defaults: 1 MiB decompressed per chunk, 64 MiB in all,
# which took the largest accepted PNG from 200 to 263 MB). One chunk's limit also bounds an ICC
# profile, so it stays at Pillow's 1 MiB; a film's text (software, XMP) is a few kB in all.
MAX_PNG_TEXT_CHUNK = 1024 * 1024
MAX_PNG_TEXT_BYTES = 1024 * 1024
# `ct-edge classify` decodes the next file while the engine runs the current one. Decodes in flight
# together may cost at most this much (preprocess.decode_cost, from the headers): what the bound
# leaves beside the runtime itself (~55-95 MB with engine and gate). A larger input runs alone.
DECODE_BUDGET_BYTES = 128 * 1024 * 1024
# `ct-edge serve` holds each request body in memory until its answer is sent. Bodies in memory at
# once may take this much (more are answered 503 before they are read): beside the runtime and
# DECODE_BUDGET_BYTES of decoding, this keeps the server inside MEMORY_BOUND_MB.
UPLOAD_BUDGET_BYTES = 48 * 1024 * 1024


# glibc's M_MMAP_THRESHOLD (mallopt parameter -3): allocations from this size up get pages of their
# own, returned to the system when freed.
MMAP_THRESHOLD_BYTES = 1024 * 1024


def return_large_frees_to_the_system() -> bool:
    """Make glibc give every allocation of MMAP_THRESHOLD_BYTES or more pages of its own; False
    where that cannot be set (another C library).

    By default glibc raises its mmap threshold after the first large buffer is freed (up to
    32 MiB), and later decode buffers then stay in each thread's heap after use: `ct-edge serve`
    under four concurrent largest uploads peaked at 387 MiB with the threshold moving, 217 MiB
    fixed at 1 MiB (benchmarks.serve_memory). For the long-running commands only (serve, listen):
    it costs `classify` page faults on every large decode (a one-off measurement, not a benchmark:
    about 5 ms more per 2,048² PNG).
    """
    import sys

    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:  # the process's own symbols: glibc's mallopt, without searching for the library
        return bool(ctypes.CDLL(None).mallopt(-3, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError, TypeError):
        return False


def check_jpeg_scans(data: bytes, name: str, limit: int = MAX_JPEG_SCANS) -> None:
    """Refuse a JPEG stream of over `limit` scans before it is decoded (InputError).

    Each scan walks the whole image again, so a small file repeating one scan takes minutes (a
    scan bomb); for JPEG frames in DICOM files too. Every 0xFFDA (start of scan) is counted:
    entropy-coded data never holds one (0xFF there is followed by 0x00 or a restart marker), so
    the count bounds the scans any decoder sees, at memory speed.
    """
    scans = data.count(b"\xff\xda")
    if scans > limit:
        raise InputError(name, f"JPEG has {scans} scan markers, over the {limit} scan limit "
                               "(progressive scan bomb guard)")
