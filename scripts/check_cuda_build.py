"""Loads a CUDA build of reclora_kernels._C and checks that every native op has CPU and CUDA kernels.

Usage: python scripts/check_cuda_build.py BUILD_LIB_DIR
Runs without a GPU: registration is checked through the dispatcher, nothing is launched.
The op list comes from the schemas in csrc/registration.cpp, so a new op is covered at once.
"""

import glob
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def native_ops():
    with open(os.path.join(ROOT, "csrc", "registration.cpp")) as f:
        source = f.read()
    return re.findall(r'm\.def\(\s*"(\w+)\(', source)


def main(build_lib):
    libraries = glob.glob(os.path.join(build_lib, "reclora_kernels", "_C*.so"))
    if len(libraries) != 1:
        sys.exit(f"expected one built library under {build_lib}/reclora_kernels, found {libraries}")
    torch.ops.load_library(libraries[0])
    print(f"loaded {libraries[0]} into torch {torch.__version__} (CUDA {torch.version.cuda})")
    ops = native_ops()
    failures = []
    for op in ops:
        for key in ("CPU", "CUDA"):
            ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"reclora::{op}", key)
            print(f"  reclora::{op:26s} {key:4s} {'registered' if ok else 'MISSING'}")
            if not ok:
                failures.append(f"{op}/{key}")
    if failures:
        sys.exit(f"missing kernels: {', '.join(failures)}")
    print(f"check-cuda: all {len(ops)} ops have CPU and CUDA kernels")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/cuda/lib")
