"""Runs Python under AddressSanitizer (memcheck) or ThreadSanitizer (racecheck) with the matching
build of the CUDA emulation library: the sanitizer's runtime is preloaded into the interpreter.

  python -m tests.cuda_emulation.sanitized address|thread -- ARGS...   (python ARGS under it)
"""

import os
import subprocess
import sys

from scripts.build_cuda_emulation import library_path

RUNTIMES = {"address": "libasan.so", "thread": "libtsan.so"}
# halt at the first report, with a nonzero exit code, so that a run fails loudly
OPTIONS = {
    "address": ("ASAN_OPTIONS", "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86"),
    "thread": ("TSAN_OPTIONS", "halt_on_error=1:exitcode=86:report_signal_unsafe=0:second_deadlock_stack=1"),
}


def runtime(sanitizer):
    out = subprocess.run(["gcc", f"-print-file-name={RUNTIMES[sanitizer]}"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def unavailable_reason(sanitizer):
    if runtime(sanitizer) is None:
        return f"gcc's {RUNTIMES[sanitizer]} was not found"
    if library_path(sanitizer) is None:
        return f"the {sanitizer}-sanitized emulation library is not built (make cuda-emulation)"
    return None


def environment(sanitizer):
    env = dict(os.environ)
    name, options = OPTIONS[sanitizer]
    env.update(
        {
            "LD_PRELOAD": runtime(sanitizer),
            name: options,
            "RECLORA_CUDA_EMULATION_LIB": library_path(sanitizer),
            # ATen's own thread pools are not instrumented: keep the host work on one thread
            "OMP_NUM_THREADS": "1",
        }
    )
    return env


def run(sanitizer, args, **kwargs):
    """python ARGS under the sanitizer; a CompletedProcess with text output."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, *args], env=environment(sanitizer), cwd=root, text=True, **kwargs)


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] not in RUNTIMES or sys.argv[2] != "--":
        sys.exit(__doc__)
    reason = unavailable_reason(sys.argv[1])
    if reason:
        sys.exit(f"sanitized: {reason}")
    sys.exit(run(sys.argv[1], sys.argv[3:]).returncode)
