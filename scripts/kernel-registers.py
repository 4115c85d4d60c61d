#!/usr/bin/env python3
"""Registers per thread of every kernel in a kernel file, as the driver would build it for a
device of compute capability 9.0, without a GPU: NVRTC (scripts/fetch-nvrtc.sh) compiles the
file, after common.cuh and with the constants of cuda-ffi/src/constants.rs, to machine code,
and the counts are read from its ELF attributes. A block's registers decide how many blocks an
SM holds (65,536 registers an SM), and for decoding's one-wave grids that decides whether a
launch needs a second wave: check a kernel change here before spending device time on it.

Each line also gives the bytes the compiler spilled to local memory (stores and loads, from
ptxas's report): a kernel held to a register limit by its launch bounds spills rather than
exceed it, and a spill puts a round trip to memory into the kernel's chain.

Usage: scripts/kernel-registers.py [--most KERNEL=REGISTERS …] [--no-spills] FILE.cu [FILE.cu …]
  --most: exit with an error when KERNEL takes more registers than that (CI keeps decoding's
  kernels within the counts their speed was measured at).
  --no-spills: exit with an error when any kernel of the files spills.
"""
import ctypes
import os
import re
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EIATTR_REGCOUNT = 0x2F


def defines():
    """-DNAME=value for each of KERNEL_DEFINES and the general ops' OP_DEFINES."""
    constants = open(os.path.join(ROOT, "cuda-ffi/src/constants.rs")).read()
    values = {name: expr.replace("_", "") for name, expr in re.findall(r"const (\w+): usize = ([^;]+);", constants)}
    names = re.findall(r'\("(\w+)", \w+\)', constants.split("KERNEL_DEFINES: ")[1])
    general = open(os.path.join(ROOT, "cuda-ffi/src/general.rs")).read()
    out = [f"-D{name}={int(eval(values[name], {}, {}))}" for name in names]
    return out + [f"-D{name}={value}" for name, value in re.findall(r'\("(\w+)", (\d+)\)', general)]


def cubin(nvrtc, path):
    source = open(os.path.join(ROOT, "cuda-ffi/kernels/common.cuh")).read() + "\n" + open(path).read()
    program = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), os.path.basename(path).encode(), 0, None, None):
        sys.exit(f"{path}: NVRTC could not take the source")
    options = [b"--gpu-architecture=sm_90", b"--ptxas-options=--verbose"] + [d.encode() for d in defines()]
    status = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    if status:
        nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(program, log)
        sys.exit(f"{path}: does not compile: {log.value.decode().strip()}")
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    image = ctypes.create_string_buffer(0)
    if nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)) == 0:
        image = ctypes.create_string_buffer(size.value)
    if size.value == 0 or nvrtc.nvrtcGetCUBIN(program, image):
        sys.exit(f"{path}: NVRTC gave no machine code")
    return image.raw, log.value.decode(errors="replace")


def spilled_bytes(log):
    """{kernel name: bytes of spill stores and loads} from ptxas's verbose report."""
    spills, kernel = {}, None
    for line in log.splitlines():
        named = re.search(r"Function properties for (\w+)", line)
        if named:
            kernel = named.group(1)
        counted = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if counted and kernel:
            spills[kernel] = int(counted.group(1)) + int(counted.group(2))
    return spills


def register_counts(elf):
    """{kernel name: registers} from the EIATTR_REGCOUNT attributes of the .nv.info sections."""
    section_offset = struct.unpack_from("<Q", elf, 0x28)[0]
    entry_size, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, section_offset + i * entry_size) for i in range(count)]

    def string(table, offset):
        start = sections[table][4] + offset
        return elf[start : elf.index(b"\0", start)].decode()

    by_name = {string(names_index, s[0]): (i, s) for i, s in enumerate(sections)}
    symbols_index, symbols = by_name[".symtab"]
    symbol_names = [
        string(symbols[6], struct.unpack_from("<I", elf, symbols[4] + i * 24)[0]) for i in range(symbols[5] // 24)
    ]
    counts = {}
    for name, (_, section) in by_name.items():
        if not name.startswith(".nv.info"):
            continue
        body, at = elf[section[4] : section[4] + section[5]], 0
        while at < len(body):
            form, attribute = body[at], body[at + 1]
            if form == 0x04:  # a sized attribute: (symbol, value) for REGCOUNT
                length = struct.unpack_from("<H", body, at + 2)[0]
                if attribute == EIATTR_REGCOUNT:
                    symbol, registers = struct.unpack_from("<II", body, at + 4)
                    counts[symbol_names[symbol]] = registers
                at += 4 + length
            else:
                at += {0x01: 2, 0x02: 3, 0x03: 4}.get(form, 2)
    return counts


def main():
    args, limits, no_spills = sys.argv[1:], {}, False
    while args[:1] in (["--most"], ["--no-spills"]):
        if args[0] == "--no-spills":
            no_spills, args = True, args[1:]
            continue
        if len(args) < 2:
            sys.exit(__doc__)
        kernel, _, most = args[1].partition("=")
        if not most.isdigit():
            sys.exit(f"--most {args[1]}: write KERNEL=REGISTERS, e.g. linear_few_rows_small=80")
        limits[kernel], args = int(most), args[2:]
    if not args or any(not path.endswith(".cu") for path in args):
        sys.exit(__doc__)
    fetched = subprocess.run([os.path.join(ROOT, "scripts/fetch-nvrtc.sh")], capture_output=True, text=True)
    if fetched.returncode != 0:
        sys.exit(f"NVRTC could not be fetched (scripts/fetch-nvrtc.sh): {fetched.stderr.strip()}")
    folder = fetched.stdout.strip()
    try:
        # NVRTC opens its builtins library by name: loaded first, it is found among those loaded
        ctypes.CDLL(os.path.join(folder, "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
        nvrtc = ctypes.CDLL(os.path.join(folder, "libnvrtc.so.13"))
    except OSError as error:
        sys.exit(f"NVRTC in {folder} does not load: {error}")
    over, spilling = [], []
    for path in args:
        image, log = cubin(nvrtc, path)
        spills = spilled_bytes(log)
        for kernel, registers in sorted(register_counts(image).items()):
            # registers are given out per warp, 8 a thread at a time
            threads = 65536 // (-(-registers // 8) * 8) if registers else 0
            spilled = spills.get(kernel, 0)
            print(
                f"{os.path.basename(path)}: {kernel}: {registers} registers a thread (an SM's registers hold {threads} threads), "
                f"{spilled} bytes spilled"
            )
            if registers > limits.pop(kernel, registers):
                over.append(kernel)
            if spilled:
                spilling.append(kernel)
    if limits:
        sys.exit(f"no such kernel in {', '.join(args)}: {', '.join(limits)}")
    if over:
        sys.exit(f"more registers than allowed (--most): {', '.join(over)}")
    if no_spills and spilling:
        sys.exit(f"spills to local memory (--no-spills): {', '.join(spilling)}")


if __name__ == "__main__":
    main()
