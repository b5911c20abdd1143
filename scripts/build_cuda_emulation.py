"""Builds the test-only CUDA emulation library: csrc/*_cuda.cu compiled as C++ for the CPU.

Usage: python scripts/build_cuda_emulation.py [--sanitizer none|address|thread] [--out DIR]
The library registers the CUDA kernels as the op set torch.ops.reclora_emulated (CPU tensors),
plus the deliberately broken kernels of tests/cuda_emulation; it is never part of the package.
  none     -O2, for `pytest -m cuda_emulation`
  address  AddressSanitizer (memcheck): load with the ASan runtime preloaded
  thread   ThreadSanitizer (racecheck): load with the TSan runtime preloaded
Prints the library's path. Rebuilds only what changed (ninja).
"""

import argparse
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANITIZER_FLAGS = {
    "none": ["-O2"],
    "address": ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"],
    "thread": ["-O1", "-g", "-fsanitize=thread"],
}


def sources():
    kernels = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda_emulation", "*.cpp")))
    return kernels + [os.path.join(ROOT, "tests", "cuda_emulation", "broken_kernels.cpp")]


def library_path(sanitizer, out=None):
    """The built library of a variant, or None when it was not built."""
    out = out or os.path.join(ROOT, "build", "cuda_emulation", sanitizer)
    found = glob.glob(os.path.join(out, "lib", "reclora_cuda_emulation*.so"))
    return found[0] if found else None


def build(sanitizer, out):
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    flags = SANITIZER_FLAGS[sanitizer] + ["-pthread", "-Wno-unknown-pragmas"]
    extension = CppExtension(
        "reclora_cuda_emulation",
        [os.path.relpath(s, ROOT) for s in sources()],
        extra_compile_args={"cxx": flags},
        extra_link_args=[f for f in flags if f.startswith("-fsanitize")] + ["-pthread"],
    )
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        setup(
            name="reclora_cuda_emulation",
            ext_modules=[extension],
            cmdclass={"build_ext": _build_ext(BuildExtension)},
            script_args=[
                "-q",
                "build_ext",
                "--build-temp",
                os.path.join(out, "tmp"),
                "--build-lib",
                os.path.join(out, "lib"),
            ],
        )
    finally:
        os.chdir(cwd)
    return library_path(sanitizer, out)


def _build_ext(base):
    class Build(base.with_options(use_ninja=True)):
        """Drops Python's own -g/-O flags so that the variant's flags decide."""

        def build_extensions(self):
            for attr in ("compiler_so", "compiler_cxx", "linker_so"):
                flags = getattr(self.compiler, attr, None)
                if flags:
                    setattr(self.compiler, attr, [f for f in flags if f not in ("-g", "-O2", "-O3")])
            super().build_extensions()

    return Build


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sanitizer", choices=sorted(SANITIZER_FLAGS), default="none")
    parser.add_argument("--out", help="build directory (default build/cuda_emulation/SANITIZER)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out or os.path.join(ROOT, "build", "cuda_emulation", args.sanitizer))
    path = build(args.sanitizer, out)
    if path is None:
        sys.exit(f"build_cuda_emulation: no library under {out}/lib")
    print(path)


if __name__ == "__main__":
    main()
