#!/usr/bin/env python3
"""List the GPU code objects inside a shared library, without any GPU tool.

    python3 ci/gpu_fatbin.py build/cuda/liblowbit_cuda13.so [--expect sm_80 sm_90 compute_90]

Reads the ELF section headers and then

* ``.nv_fatbin`` (nvcc and clang CUDA builds): a sequence of fat binary containers, one per
  translation unit (magic 0xBA55ED50); each holds entries of kind 1 (PTX, reported as
  ``compute_XY``) or 2 (an ELF cubin, reported as ``sm_XY``) with the target in the entry header;
* ``.hip_fatbin`` (hipcc / clang HIP builds): one clang offload bundle per translation unit
  (``__CLANG_OFFLOAD_BUNDLE__``) whose entry ids end with the target (``hipv4-amdgcn-amd-amdhsa--
  gfx90a``).

With ``--expect`` it exits non-zero unless *every* container (every .cu file that carries device
code) has code for every expected target: a kernel file compiled for fewer archs than the others
fails the check, which a library-wide listing would miss. ``tests/test_gpu_backends.py`` and the
``build_*`` nox sessions use :func:`list_targets`; the nox sessions also cross-check with
``cuobjdump --list-elf`` / ``clang-offload-bundler --list`` when those tools are present.
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path
from typing import Optional

CUDA_FATBIN_MAGIC = 0xBA55ED50
CLANG_BUNDLE_MAGIC = b"__CLANG_OFFLOAD_BUNDLE__"
_KIND = {1: "compute", 2: "sm"}


def elf_sections(data: bytes) -> dict[str, bytes]:
    """Section name -> contents of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = []
    for i in range(shnum):
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        headers.append((name, _type, offset, size))
    strtab_off, strtab_size = headers[shstrndx][2], headers[shstrndx][3]
    strtab = data[strtab_off : strtab_off + strtab_size]
    sections = {}
    for name, sh_type, offset, size in headers:
        label = strtab[name : strtab.index(b"\0", name)].decode()
        sections[label] = b"" if sh_type == 8 else data[offset : offset + size]  # 8 = SHT_NOBITS
    return sections


def cuda_containers(blob: bytes) -> list[list[str]]:
    """Targets of each fat binary container in a .nv_fatbin section, in order."""
    containers = []
    pos = 0
    while pos + 16 <= len(blob):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != CUDA_FATBIN_MAGIC:
            pos += 8  # containers are 8-byte aligned; skip padding
            continue
        targets = []
        entry = pos + header_size
        end = entry + fat_size
        while entry + 32 <= end:
            kind, _ver, entry_header, payload = struct.unpack_from("<HHIQ", blob, entry)
            (arch,) = struct.unpack_from("<I", blob, entry + 28)
            targets.append(f"{_KIND.get(kind, f'kind{kind}')}_{arch}")
            if entry_header == 0:
                break
            entry += entry_header + payload
        containers.append(targets)
        pos = end
    return containers


def hip_containers(blob: bytes) -> list[list[str]]:
    """Targets of each clang offload bundle in a .hip_fatbin section (host entries left out)."""
    containers = []
    start = blob.find(CLANG_BUNDLE_MAGIC)
    while start >= 0:
        (count,) = struct.unpack_from("<Q", blob, start + len(CLANG_BUNDLE_MAGIC))
        pos = start + len(CLANG_BUNDLE_MAGIC) + 8
        targets = []
        for _ in range(count):
            _offset, _size, id_len = struct.unpack_from("<QQQ", blob, pos)
            bundle_id = blob[pos + 24 : pos + 24 + id_len].decode()
            pos += 24 + id_len
            if not bundle_id.startswith("host-"):
                targets.append(bundle_id.rsplit("-", 1)[-1].split(":")[0])
        containers.append(targets)
        start = blob.find(CLANG_BUNDLE_MAGIC, pos)
    return containers


def list_targets(library: Path) -> dict[str, object]:
    """{"kind": "cuda"|"hip"|None, "containers": [[targets of one .cu], ...], "targets": union}."""
    sections = elf_sections(Path(library).read_bytes())
    kind: Optional[str] = None
    containers: list[list[str]] = []
    if ".nv_fatbin" in sections:
        kind, containers = "cuda", cuda_containers(sections[".nv_fatbin"])
    elif ".hip_fatbin" in sections:
        kind, containers = "hip", hip_containers(sections[".hip_fatbin"])
    union = sorted({t for c in containers for t in c}, key=_target_key)
    return {"kind": kind, "containers": containers, "targets": union}


def _target_key(target: str) -> tuple:
    prefix, _, number = target.rpartition("_")
    return (prefix, int(number)) if number.isdigit() else (target, 0)


def missing(listing: dict[str, object], expected: list[str]) -> list[str]:
    """Human-readable problems: expected targets absent from some container."""
    problems = []
    containers = listing["containers"]
    if not containers:
        return [f"no device code found (expected {' '.join(expected)})"]
    for index, targets in enumerate(containers):
        absent = [t for t in expected if t not in targets]
        if absent:
            problems.append(f"container {index} ({' '.join(targets) or 'empty'}) lacks {' '.join(absent)}")
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", type=Path)
    parser.add_argument("--expect", nargs="*", default=[], help="targets every container must hold")
    args = parser.parse_args(argv)
    listing = list_targets(args.library)
    print(f"{args.library}: {listing['kind'] or 'no GPU code'}; {len(listing['containers'])} containers")
    for index, targets in enumerate(listing["containers"]):
        print(f"  container {index}: {' '.join(targets)}")
    print(f"  targets: {' '.join(listing['targets'])}")
    if args.expect:
        problems = missing(listing, args.expect)
        for problem in problems:
            print(f"  MISSING: {problem}")
        if problems:
            return 1
        print(f"  every container holds {' '.join(args.expect)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
