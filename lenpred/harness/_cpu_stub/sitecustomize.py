"""DEV/TEST ONLY — put on PYTHONPATH by `lenpred.harness.engine` to run real SGLang on a CPU-only machine.

The PyPI `sglang-kernel` wheel is CUDA-only: `import sgl_kernel` runs `sgl_kernel.load_utils`, which
dlopens the CUDA build of its op library (needs libcuda.so.1) and fails on a GPU-less box. This
file replaces *only* that module with a stub whose loaders load nothing. The rest of `sgl_kernel`
(pure-Python wrappers) imports normally; no op is implemented here. With the ops absent, SGLang's
CPU engine (`SGLANG_USE_CPU_ENGINE=1`) finds no AMX kernels and runs its own plain-torch paths.

Never used in production: on a GPU, SGLang and sgl-kernel run unmodified and this directory is not
on PYTHONPATH. Active only when LENPRED_CPU_STUB=1 (set by the launcher).
"""
import importlib.abc
import importlib.machinery
import os
import sys
import types

_NAME = "sgl_kernel.load_utils"


def _stub_module() -> types.ModuleType:
    mod = types.ModuleType(_NAME)
    mod.__file__ = __file__
    mod.__doc__ = "lenpred CPU stub: loads no native sgl-kernel library"

    def _load_architecture_specific_ops():
        return None

    def _preload_cuda_library():
        return None

    def _get_compute_capability():
        return None

    def _filter_compiled_extensions(file_list):
        return []

    def _find_cuda_home():
        return None

    for fn in (_load_architecture_specific_ops, _preload_cuda_library, _get_compute_capability,
               _filter_compiled_extensions, _find_cuda_home):
        setattr(mod, fn.__name__, fn)
    return mod


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return _stub_module()

    def exec_module(self, module):
        return None


class _StubFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == _NAME:
            return importlib.machinery.ModuleSpec(_NAME, _StubLoader())
        return None


if os.environ.get("LENPRED_CPU_STUB") == "1" and not any(isinstance(f, _StubFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _StubFinder())
