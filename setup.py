"""Builds treeq_engine._C with CMake (pybind11, optional CUDA). Metadata lives in pyproject.toml.

Environment:
  TREEQ_CUDA=auto|0|1     build the CUDA sources: when nvcc is found (default) / never / always (fail if absent)
  TREEQ_CUDA_ARCHS        CUDA architectures, default "80;90a"
  TREEQ_BUILD_DIR         CMake build directory, default build/<python tag>
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("TREEQ_BUILD_DIR", ROOT / "build" / f"py{sys.version_info[0]}{sys.version_info[1]}"))
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("TREEQ_CUDA", "auto").strip().lower()
        cuda = {"auto": "AUTO", "1": "ON", "on": "ON", "0": "OFF", "off": "OFF"}.get(cuda)
        if cuda is None:
            raise SystemExit(f"TREEQ_CUDA must be auto, 0 or 1, got {os.environ['TREEQ_CUDA']!r}")
        cmake = shutil.which("cmake")
        if cmake is None:
            raise SystemExit("cmake not found: pip install cmake")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTREEQ_CUDA={cuda}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if os.environ.get("TREEQ_CUDA_ARCHS"):
            args.append(f"-DTREEQ_CUDA_ARCHS={os.environ['TREEQ_CUDA_ARCHS']}")
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            args += ["-G", "Ninja"]
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


setup(ext_modules=[CMakeExtension("treeq_engine._C")], cmdclass={"build_ext": CMakeBuild})
