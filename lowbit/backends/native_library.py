"""Opening lowbit's native libraries (``liblowbit_cpu.so``, ``liblowbit_cuda.so``, ``liblowbit_hip.so``)
so that a bad file gives a reason instead of killing the process.

``dlopen`` maps each loadable segment (``PT_LOAD``) of an ELF file and reads it in place: if the
file is shorter than its headers claim (a truncated copy, an interrupted download), touching the
missing pages raises SIGBUS inside ``ctypes.CDLL``. So before ``dlopen`` the file's ELF header is
checked against this process (64-bit, byte order, machine, a shared object) and every table and
segment the loader reads must lie inside the file. Everything the loader reads at load time
(dynamic section, symbol and relocation tables) sits inside the ``PT_LOAD`` ranges, so a file that
passes cannot fault by being short; a complete file with corrupted contents is not detectable
without running it and is out of scope (as is any library that misbehaves in its constructors).

The check reads only the headers (a few hundred bytes) and is skipped off Linux, where the library
is not ELF and ``dlopen`` is not the loader.
"""

from __future__ import annotations

import ctypes
import platform
import struct
import sys
from pathlib import Path
from typing import Optional

# ELF constants (System V ABI, elf.h)
_MAGIC = b"\x7fELF"
_CLASS_64 = 2
_DATA = {"little": 1, "big": 2}
_ET_DYN = 3
_PT_LOAD, _PT_DYNAMIC = 1, 2
_EHDR_SIZE, _PHDR_SIZE, _SHDR_SIZE = 64, 56, 64
#: e_machine of the host architectures lowbit builds on (platform.machine() spelling)
_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183, "ppc64le": 21, "s390x": 22, "riscv64": 243}
_MACHINE_NAMES = {62: "x86-64", 183: "AArch64", 21: "PowerPC64", 22: "s390x", 243: "RISC-V", 3: "x86 (32-bit)", 40: "ARM (32-bit)"}


def elf_problem(path: Path) -> Optional[str]:
    """None when ``path`` is an ELF shared object for this process whose tables and loadable
    segments all lie inside the file, else what is wrong with it."""
    if not path.is_file():
        return "it is not a regular file"
    size = path.stat().st_size
    with path.open("rb") as f:
        header = f.read(_EHDR_SIZE)
        if not header:
            return "it is empty"
        if header[:4] != _MAGIC:
            return f"it is not an ELF shared library (it starts with {header[:16]!r})"
        if len(header) < _EHDR_SIZE:
            return f"it is truncated: {size} bytes, shorter than an ELF header"
        if header[4] != _CLASS_64:
            return "it is a 32-bit ELF file; this Python is 64-bit"
        if header[5] != _DATA[sys.byteorder]:
            return f"its byte order is not this machine's ({sys.byteorder}-endian)"
        order = "<" if sys.byteorder == "little" else ">"
        e_type, e_machine = struct.unpack_from(order + "HH", header, 16)
        e_phoff, e_shoff = struct.unpack_from(order + "QQ", header, 32)
        e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from(order + "HHHH", header, 54)
        host = _MACHINES.get(platform.machine().lower())
        if host is not None and e_machine != host:
            built_for = _MACHINE_NAMES.get(e_machine, f"ELF machine {e_machine}")
            return f"it is built for {built_for}, this machine is {platform.machine()}"
        if e_type != _ET_DYN:
            return f"it is not a shared library (ELF type {e_type}, a shared object is {_ET_DYN})"
        if e_phnum == 0 or e_phentsize != _PHDR_SIZE:
            return f"its program header table is malformed ({e_phnum} entries of {e_phentsize} bytes)"
        if e_phoff + e_phnum * _PHDR_SIZE > size:
            return f"it is truncated: the program headers end at byte {e_phoff + e_phnum * _PHDR_SIZE}, the file has {size}"
        if e_shnum and (e_shentsize != _SHDR_SIZE or e_shoff + e_shnum * _SHDR_SIZE > size):
            return f"it is truncated: the section headers end at byte {e_shoff + e_shnum * e_shentsize}, the file has {size}"
        f.seek(e_phoff)
        table = f.read(e_phnum * _PHDR_SIZE)
    for index in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(order + "IIQQQQ", table, index * _PHDR_SIZE)
        if p_type in (_PT_LOAD, _PT_DYNAMIC) and p_offset + p_filesz > size:
            kind = "loadable segment" if p_type == _PT_LOAD else "dynamic section"
            return f"it is truncated: {kind} {index} ends at byte {p_offset + p_filesz}, the file has {size}"
    return None


def load(path: Path) -> ctypes.CDLL:
    """``ctypes.CDLL(path)`` after :func:`elf_problem` found nothing wrong; OSError with the reason
    otherwise (as ``ctypes.CDLL`` raises for files ``dlopen`` rejects)."""
    if sys.platform.startswith("linux"):
        problem = elf_problem(path)
        if problem is not None:
            raise OSError(problem)
    return ctypes.CDLL(str(path))
