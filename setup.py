"""Build script: the package is pure Python plus the optional compiled extension ``ul_fast._C``.

``ul_fast._C`` is a pybind11 module over raw pointers, checked at its boundary (csrc/boundary.h), with no torch
headers (so no torch C++ ABI coupling):
C++ kernels with OpenMP always, CUDA kernels when nvcc is found. Environment variables:

- ``UL_FAST_CUDA``: ``auto`` (default: build the CUDA part when nvcc is found), ``1`` (require it),
  ``0`` (CPU only).
- ``UL_FAST_CUDA_ARCHS``: ``;``-separated compute capabilities, default ``80+PTX;90a`` (sm_80 and
  sm_90a machine code plus compute_80 PTX that newer GPUs JIT-compile). ``+PTX`` adds PTX for that arch.
- ``UL_FAST_NVCC``: the nvcc to use (default: ``$CUDA_HOME/bin/nvcc`` or the first on PATH).

The CUDA runtime is linked statically, so the module needs only the driver at run time.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80+PTX;90a"


def load_extension_version() -> ModuleType:
    """``ul_fast/kernels/extension_version.py`` (API version and source-hash recipe, shared with the loader that
    refuses a stale build), loaded by path: the package cannot be imported before it is built."""
    path = ROOT / "ul_fast" / "kernels" / "extension_version.py"
    spec = importlib.util.spec_from_file_location("ul_fast_extension_version", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VERSION = load_extension_version()


def find_nvcc() -> str | None:
    explicit = os.environ.get("UL_FAST_NVCC")
    if explicit:
        return explicit
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def toolkit_root(nvcc: str) -> Path:
    """The real toolkit root, read from ``nvcc --dryrun`` (the nvcc on PATH may be a wrapper script)."""
    dryrun = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    match = re.search(r"^#\$ TOP=(.+)$", dryrun.stderr + dryrun.stdout, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"could not find the CUDA toolkit root in `{nvcc} --dryrun` output")
    return Path(match.group(1).strip()).resolve()


def cudart_static_dir(root: Path) -> Path:
    for candidate in (root / "targets" / "x86_64-linux" / "lib", root / "targets" / "sbsa-linux" / "lib",
                      root / "lib64", root / "lib"):
        if (candidate / "libcudart_static.a").exists():
            return candidate
    raise RuntimeError(f"libcudart_static.a not found under {root}")


def gencode_flags(archs: str) -> list[str]:
    """``80+PTX;90a`` -> nvcc -gencode flags (sm_XX machine code, plus compute_XX PTX for ``+PTX``)."""
    flags = []
    for token in filter(None, (t.strip() for t in archs.replace(",", ";").split(";"))):
        arch, _, suffix = token.partition("+")
        if not re.fullmatch(r"\d+[af]?", arch) or suffix not in ("", "PTX"):
            raise ValueError(f"UL_FAST_CUDA_ARCHS: bad entry {token!r} (expected e.g. 80, 90a or 80+PTX)")
        codes = [f"sm_{arch}"] + ([f"compute_{arch}"] if suffix else [])
        flags.append(f"-gencode=arch=compute_{arch},code=[{','.join(codes)}]")
    if not flags:
        raise ValueError("UL_FAST_CUDA_ARCHS is empty")
    return flags


def first_line(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def c_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class BuildExt(build_ext):
    """Compiles csrc/cuda_ops.cu with nvcc (when enabled) and links it, with static cudart, into _C."""

    def build_extension(self, ext):
        mode = os.environ.get("UL_FAST_CUDA", "auto").strip().lower() or "auto"
        if mode not in ("auto", "0", "1"):
            raise ValueError(f"UL_FAST_CUDA must be auto, 0 or 1, got {mode!r}")
        nvcc = find_nvcc() if mode != "0" else None
        if mode == "1" and nvcc is None:
            raise RuntimeError("UL_FAST_CUDA=1 but nvcc was not found (set CUDA_HOME or UL_FAST_NVCC)")

        gen_dir = Path(self.build_temp) / "ul_fast_gen"
        gen_dir.mkdir(parents=True, exist_ok=True)
        compiler = self.compiler.compiler_so[0] if getattr(self.compiler, "compiler_so", None) else "c++"
        config = {
            "UL_FAST_API_VERSION": str(VERSION.API_VERSION),
            "UL_FAST_SOURCE_HASH": c_string(VERSION.source_hash(CSRC)),
            "UL_FAST_CXX_COMPILER": c_string(first_line([compiler, "--version"])),
            "UL_FAST_BUILD_TIME": c_string(datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
        }
        if nvcc is not None:
            archs = os.environ.get("UL_FAST_CUDA_ARCHS", DEFAULT_ARCHS)
            root = toolkit_root(nvcc)
            version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip()
            config["UL_FAST_CUDA_ARCHS"] = c_string(archs)
            config["UL_FAST_NVCC_VERSION"] = c_string(version.splitlines()[-1] if version else "unknown")
            obj = gen_dir / "cuda_ops.o"
            command = [nvcc, "-c", str(CSRC / "cuda_ops.cu"), "-o", str(obj), "-O3", "-std=c++17",
                       "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", "-lineinfo",
                       "-DUL_FAST_WITH_CUDA", f"-I{CSRC}", f"-I{gen_dir}", "--threads", "0",
                       *gencode_flags(archs)]
            print("ul_fast: compiling CUDA kernels:", " ".join(command), flush=True)
            subprocess.run(command, check=True)
            ext.extra_objects.append(str(obj))
            ext.define_macros.append(("UL_FAST_WITH_CUDA", None))
            ext.library_dirs.append(str(cudart_static_dir(root)))
            ext.libraries.extend(["cudart_static", "rt", "pthread", "dl"])
        else:
            print(f"ul_fast: building the CPU kernels only (UL_FAST_CUDA={mode}, nvcc "
                  f"{'not searched' if mode == '0' else 'not found'})", flush=True)
        header = "".join(f"#define {key} {value}\n" for key, value in config.items())
        (gen_dir / "build_config.h").write_text("#pragma once\n" + header)
        ext.include_dirs.append(str(gen_dir))
        super().build_extension(ext)


extension = Pybind11Extension(
    "ul_fast._C",
    sources=["csrc/bindings.cpp", "csrc/cpu_ops.cpp"],
    include_dirs=["csrc"],
    cxx_std=17,
    # No FMA contraction: the kernels round every multiply and add as the fp32 reference does.
    extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],
    extra_link_args=["-fopenmp"],
)

if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for find_nvcc, gencode_flags
    setup(ext_modules=[extension], cmdclass={"build_ext": BuildExt})
