"""The op libraries are built on the LibTorch stable ABI: they name no C++ symbol of libtorch, so
a torch upgrade cannot break them with "undefined symbol" (docs/stable_abi.md). Checked on the
installed files with binutils' ``nm``/``readelf`` (present wherever the package was compiled)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

import layerpress

PKG = os.path.dirname(layerpress._C.__file__)
LIBS = [p for p in (os.path.join(PKG, "_C.abi3.so"), os.path.join(PKG, "liblayerpress_cuda.so"))
        if os.path.exists(p)]

# Undefined symbols without a version tag (system libraries -- glibc, libstdc++, libgcc, libcudart --
# version theirs) must be torch's C shim or, in _C.abi3.so, CPython's module constructor.
UNVERSIONED_OK = re.compile(r"^(aoti_torch_\w+|torch_\w+|PyModule_Create2)$")
TORCH_CPP = re.compile(r"\b(c10|at|torch|caffe2)::")


def _tool(name):
    path = shutil.which(name)
    assert path, f"{name} (binutils) is needed to inspect the built libraries"
    return path


def _undefined(lib):
    """[(name, version or "", demangled, weak)] of the library's undefined dynamic symbols."""
    def rows(*flags):
        out = subprocess.run([_tool("nm"), "-D", "--undefined-only", *flags, lib], capture_output=True,
                             text=True, check=True).stdout
        return [line.split(None, 1) for line in out.splitlines() if line.strip()]
    syms = []
    for (kind, raw), (_, dem) in zip(rows(), rows("-C")):
        name, _, version = raw.partition("@")
        syms.append((name, version, dem.partition("@")[0], kind == "w"))
    return syms


def test_installed_libraries_found():
    assert os.path.basename(layerpress._C.__file__) == "_C.abi3.so"
    assert LIBS and LIBS[0].endswith("_C.abi3.so")


@pytest.mark.parametrize("lib", LIBS, ids=os.path.basename)
def test_no_cpp_symbol_of_libtorch(lib):
    syms = _undefined(lib)
    assert any(n.startswith("aoti_torch_") for n, *_ in syms)  # it really calls torch, via the shim
    bad = [d for _, _, d, _ in syms if TORCH_CPP.search(d)]
    assert bad == [], f"{os.path.basename(lib)} names C++ symbols of libtorch: {bad[:10]}"
    unversioned = [n for n, v, _, weak in syms if not v and not weak and not UNVERSIONED_OK.match(n)]
    assert unversioned == [], f"undefined symbols from no system library and not torch's C shim: {unversioned}"
    # the C++ symbols left are the standard library's
    cpp = [d for n, _, d, _ in syms if n.startswith("_Z")]
    assert all(d.startswith(("std::", "operator ", "vtable for ", "typeinfo for std::", "VTT for std::"))
               for d in cpp), cpp


@pytest.mark.parametrize("lib", LIBS, ids=os.path.basename)
def test_links_only_libtorch_cpu(lib):
    dyn = subprocess.run([_tool("readelf"), "-d", lib], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn)
    torch_libs = [n for n in needed if n.startswith(("libtorch", "libc10", "libshm"))]
    assert torch_libs == ["libtorch_cpu.so"], needed
    assert not any(n.startswith("libpython") for n in needed), needed


def test_build_info_reports_the_stable_target():
    info = layerpress.build_info()
    assert info["stable_abi_target"] == "2.10"
    assert info["torch_version"] and info["torch_runtime_version"] == torch.__version__
    assert info["cuda_library"] in ("loaded", "not built (no nvcc at build time)",
                                    "not loaded (a CPU build of torch)") or \
        info["cuda_library"].startswith("failed to load")
    assert info["cuda"] == (info["cuda_library"] == "loaded")
