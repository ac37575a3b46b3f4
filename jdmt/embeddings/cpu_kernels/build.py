"""Compile the CPU kernels lazily with the system C++ compiler, once per machine.

The shared library is cached under `$JDMT_CACHE_DIR` (default
`$XDG_CACHE_HOME/jdmt` or `~/.cache/jdmt`, else a per-user temp directory),
named by a hash of the source, the jax/jaxlib versions, the compiler and its
flags, and this CPU's model and features, so a change of any of them builds
afresh. It is built for this CPU's instruction set (`-march=native`: AVX2 /
AVX-512 where the CPU has them; measured on the lookup benchmark's forward,
9 ms against 12-15 ms for the portable x86-64 baseline), which is safe in a
cache shared between machines because the CPU is part of the name. If the
compiler refuses `-march=native`, or `JDMT_CPU_KERNELS_NATIVE=0` is set, the
portable build is used; `-ffp-contract=off` keeps the results bitwise the
same on every instruction set (no fused multiply-adds, no reordered sums). Concurrent builds (several
processes at once) are safe: each compiles into its own temporary file and
renames it into place atomically; the last rename wins with identical
contents.

Nothing here raises: `build()` returns `(path, None)` or `(None, reason)`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("sparse_update.cc")
# -ffp-contract=off: no fused multiply-adds, so results do not depend on the CPU.
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno",
         "-fvisibility=hidden", "-pthread")
NATIVE = ("-march=native",)
TIMEOUT_S = 300


def _compiler() -> str | None:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _cache_dirs() -> list[Path]:
    out = []
    if os.environ.get("JDMT_CACHE_DIR"):
        out.append(Path(os.environ["JDMT_CACHE_DIR"]))
    xdg = os.environ.get("XDG_CACHE_HOME")
    out.append(Path(xdg) / "jdmt" if xdg else Path.home() / ".cache" / "jdmt")
    out.append(Path(tempfile.gettempdir()) / f"jdmt-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
    return out


def cpu_identity() -> str:
    """This CPU's model and instruction-set features (what `-march=native`
    compiles for), or the platform's machine name where they are not known."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            keys = ("model name", "flags", "cpu implementer", "cpu part", "features")
            seen = {}
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k in keys and k not in seen:
                    seen[k] = " ".join(sorted(v.split())) if k in ("flags", "features") else v.strip()
                if not line.strip() and seen:  # the first processor is enough
                    break
        if seen:
            return platform.machine() + ";" + ";".join(f"{k}={seen[k]}" for k in sorted(seen))
    except OSError:
        pass
    return f"{platform.machine()};{platform.processor()}"


def native_wanted() -> bool:
    return os.environ.get("JDMT_CPU_KERNELS_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def _version(cxx: str) -> str:
    try:
        r = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return r.stdout.splitlines()[0] if r.stdout else ""
    except Exception:  # noqa: BLE001
        return ""


def build() -> tuple[str | None, str | None]:
    """(path of the shared library, None) or (None, why it could not be built).

    The library is built for this CPU (`NATIVE`) unless that is turned off
    or the compiler refuses it (remembered in the cache, so it is tried once);
    then portably. A native library's file name says `native`."""
    if sys.platform not in ("linux", "darwin"):
        return None, f"CPU kernels are built on Linux/macOS only (platform {sys.platform})"
    try:
        import jax
        import jaxlib

        include = jax.ffi.include_dir()
    except Exception as e:  # noqa: BLE001
        return None, f"jax.ffi include directory not found: {e!r}"
    if not (Path(include) / "xla" / "ffi" / "api" / "ffi.h").is_file():
        return None, f"xla/ffi/api/ffi.h not found under {include}"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found (tried $CXX, g++, c++, clang++)"
    try:
        src = SOURCE.read_bytes()
    except OSError as e:
        return None, f"kernel source unreadable: {e}"
    version = _version(cxx)
    dirs = _cache_dirs()

    def named(native: bool) -> tuple[str, tuple[str, ...]]:
        flags = FLAGS + NATIVE if native else FLAGS
        h = hashlib.sha256()
        for part in (src, jax.__version__.encode(), jaxlib.__version__.encode(), cxx.encode(),
                     version.encode(), " ".join(flags).encode(), include.encode(),
                     cpu_identity().encode() if native else b""):
            h.update(part)
            h.update(b"\0")
        return f"sparse_update-{'native-' if native else ''}{h.hexdigest()[:16]}.so", flags

    native_why = None
    if native_wanted():
        native, flags = named(True)
        if not any((d / (native + ".refused")).is_file() for d in dirs):
            path, native_why = _build_into(dirs, native, [cxx, *flags, "-I", include, str(SOURCE)])
            if path is not None:
                return path, None
    name, flags = named(False)
    path, why = _build_into(dirs, name, [cxx, *flags, "-I", include, str(SOURCE)])
    if path is not None and native_why and native_why.startswith("compile failed"):
        # this compiler refuses the native build but makes the portable one: remember
        try:
            Path(path).with_name(native + ".refused").write_text(native_why)
        except OSError:
            pass
    return path, why


def _build_into(dirs: list[Path], name: str, cmd: list[str]) -> tuple[str | None, str | None]:
    """Compile `cmd` into the first writable cache directory as `name` (or
    find it there already)."""
    errors = []
    for d in dirs:
        path = d / name
        if path.is_file():
            return str(path), None
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=d)
            os.close(fd)
        except OSError as e:
            errors.append(f"{d}: {e}")
            continue
        try:
            full = [*cmd, "-o", tmp]
            try:
                r = subprocess.run(full, capture_output=True, text=True, timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return None, f"compiler timed out after {TIMEOUT_S} s: {' '.join(full)}"
            except OSError as e:
                return None, f"compiler could not run: {e}"
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip()[-2000:]
                return None, f"compile failed ({' '.join(full)}):\n{tail}"
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)  # atomic: concurrent builders never see a partial file
            return str(path), None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None, "no writable cache directory: " + "; ".join(errors)
