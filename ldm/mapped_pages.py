"""Give a memory-mapped checkpoint's pages back once the weights read from them are replaced.

Checkpoints load memory-mapped (``ldm.checkpoint``): a weight's bytes are pages of the file, mapped
privately into the process and resident once read, where they count in its RSS until the mapping
goes, and one mapping holds the whole file. A weight replaced by a converted copy (the U-Net held
in bfloat16, ``ldm.precision.hold_weights_in``) leaves its float32 pages resident for nothing.
:func:`release_file_pages` drops them with ``madvise(MADV_DONTNEED)``, which for a private file
mapping only unmaps the pages: reading them again would fault the file's bytes back in. Only whole
pages inside a tensor's own bytes that lie in a private mapping of a file are touched, never
anonymous memory (which the call would zero); elsewhere than Linux it does nothing.
"""
import ctypes
import logging
import mmap
import sys

log = logging.getLogger(__name__)

MADV_DONTNEED = 4


def _private_file_mappings():
    """[(start, end)] of this process's private mappings of regular files (/proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[4] == "0" or not fields[5].startswith("/") or fields[1][3] != "p":
                continue
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _madvise_and_mappings():
    """(libc's madvise, the private file mappings), or (None, []) where there are none to use."""
    if not sys.platform.startswith("linux"):
        return None, []
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        mappings = _private_file_mappings()
    except (OSError, AttributeError):
        return None, []
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise, mappings


def release_file_pages(tensors):
    """Drop the resident pages of ``tensors`` (no longer used) that a private file mapping holds;
    returns the bytes released. ``tensors`` may be a generator: each is released as it comes (every
    one of them is taken, on any platform)."""
    madvise, mappings = _madvise_and_mappings()
    if madvise is None:
        for _ in tensors:
            pass
        return 0
    page = mmap.PAGESIZE
    released = 0
    for tensor in tensors:
        start = tensor.data_ptr()
        first = -(-start // page) * page                                  # whole pages inside the bytes
        last = (start + tensor.numel() * tensor.element_size()) // page * page
        if last <= first or not any(low <= first and last <= high for low, high in mappings):
            continue
        if madvise(first, last - first, MADV_DONTNEED) == 0:
            released += last - first
        else:
            log.debug("madvise failed (errno %d)", ctypes.get_errno())
    return released
