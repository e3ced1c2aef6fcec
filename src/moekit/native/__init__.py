"""C++ kernels for the CPU, compiled on first use with this machine's compiler and cached.

Why compiled here: the kernels are vectorised for the CPU they run on (-march=native; measured
on AVX-512 hosts with and without BF16 and on AVX2-only ones) and use OpenMP for all cores; a wheel
built elsewhere could not do both. The library is built once per source, compiler and CPU into
$MOEKIT_CACHE_DIR (default ~/.cache/moekit)/native/ (the sources compiled side by side: ~12 s on a
2-core machine), written to a temporary name and renamed, so concurrent first uses never load half
a file. Nothing is downloaded.

Every *.cpp in this folder goes into that one library (common.h holds what they share); a module declares its functions' ctypes
signatures with `register_declarations`. Where no compiler works (or MOEKIT_NATIVE=0), `library()` returns None and says why in
`unavailable_reason()`; callers then run their PyTorch path, which gives the same results more
slowly. The functions are called through ctypes, which releases the GIL for the call's duration.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FOLDER = Path(__file__).parent  # every *.cpp here is compiled into the one library
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

_library: ctypes.CDLL | None = None
_declarations: list = []  # callables that set argtypes/restype of a module's functions on the library


def register_declarations(declare) -> None:
    """Adds a callable(lib) that declares one source file's functions (argtypes, restype); called
    when the library loads (or at once, if it already has)."""
    _declarations.append(declare)
    if _library is not None:
        declare(_library)
_reason = ""
_tried = False


def cache_dir() -> Path:
    """Returns the folder compiled libraries are kept in."""
    root = os.environ.get("MOEKIT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moekit"
    return Path(root) / "native"


def compiler() -> str | None:
    """Returns the C++ compiler to use ($CXX, else g++, c++ or clang++ on the PATH), or None."""
    return os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


def _cpu_signature() -> str:
    """Returns what identifies this CPU's instruction set (a library built for another is rebuilt)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                return line
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


def _build(cxx: str) -> Path:
    """Returns the path of the compiled library, compiling it if this source, compiler and CPU
    have none yet; raises RuntimeError with the compiler's message when it fails."""
    sources = sorted(FOLDER.glob("*.cpp"))
    # the headers they include count too: a changed common.h must rebuild the library
    source = b"\0".join(p.name.encode() + b"\0" + p.read_bytes() for p in sorted(FOLDER.glob("*.[ch]*")))
    version = subprocess.run([cxx, "--version"], check=False, capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    folder = cache_dir()
    target = folder / f"moekit_native_{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    if sys.stderr is not None and sys.stderr.isatty():  # ~10-20 s of silence on a first run otherwise
        print("moekit: compiling the CPU kernels for this machine (once)...", file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=folder) as work:
            _compile(cxx, sources, Path(work), tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _compile(cxx: str, sources: list[Path], work: Path, out: str) -> None:
    """Compiles each source to an object in `work`, as many at once as this process has cores
    (largest first: 21 s in one call on the 2-core VM, ~11 s on two), then links them into `out`;
    raises RuntimeError with the compiler's message when one fails."""
    from concurrent.futures import ThreadPoolExecutor

    compile_flags = [f for f in FLAGS if f != "-shared"]

    def run(args: list[str]) -> None:
        done = subprocess.run([cxx, *args], check=False, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {(done.stderr or done.stdout).strip()[-2000:]}")

    objects = [work / (src.stem + ".o") for src in sources]
    order = sorted(zip(sources, objects), key=lambda pair: -pair[0].stat().st_size)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, min(cores, len(order)))) as pool:
        list(pool.map(lambda pair: run([*compile_flags, "-c", str(pair[0]), "-o", str(pair[1])]), order))
    run([*FLAGS, *map(str, objects), "-o", out])


def library() -> ctypes.CDLL | None:
    """Returns the loaded kernel library, building it on first use; None where it cannot be had
    (then `unavailable_reason()` says why)."""
    global _library, _reason, _tried
    if _tried:
        return _library
    _tried = True
    if os.environ.get("MOEKIT_NATIVE", "1") == "0":
        _reason = "MOEKIT_NATIVE=0"
        return None
    cxx = compiler()
    if cxx is None:
        _reason = "no C++ compiler found (set CXX, or install g++)"
        return None
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _reason = f"the CPU kernels could not be built: {e}"
        return None
    i64, i32p, i64p, f32p, vp = ctypes.c_int64, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int64), \
        ctypes.POINTER(ctypes.c_float), ctypes.c_void_p
    lib.moekit_expert_ffn.argtypes = [ctypes.c_int, ctypes.c_int, vp, vp, i64, i64, i64, i64, i64, i64p, i64p, i32p,
                                      i32p, f32p, f32p, f32p, f32p, ctypes.c_int]
    lib.moekit_expert_ffn.restype = ctypes.c_int
    lib.moekit_linear.argtypes = [ctypes.c_int, ctypes.c_int, vp, vp, f32p, vp, i64, i64, i64, f32p, ctypes.c_int]
    lib.moekit_linear.restype = ctypes.c_int
    lib.moekit_stream_read.argtypes = [vp, i64, ctypes.c_int]
    lib.moekit_stream_read.restype = ctypes.c_double
    lib.moekit_team_regions.argtypes = []  # regions run on the runner's own team so far (team.h)
    lib.moekit_team_regions.restype = i64
    for declare in _declarations:  # other modules' functions (register_declarations)
        declare(lib)
    _library = lib
    return lib


def unavailable_reason() -> str:
    """Returns why `library()` is None ('' when it loaded or was not tried)."""
    return _reason
