"""What every results file records (machine, ISA path, versions, threads, load, date), and where
results files go (RESULTS)."""

import datetime
import os
import platform
import re
import subprocess

import torch

from reclora.files import write_json
from reclora_kernels import cpu_features

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Environment variables that choose an ISA path: ours, and those of the libraries behind PyTorch.
ISA_VARIABLES = ("RECLORA_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def describe():
    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_features.cpu_model(),
        **cpu_features.describe(),
        "isa_variables": {name: os.environ.get(name) for name in ISA_VARIABLES},
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def cpu_slug():
    """The CPU model as a file-name part: "intel-r-xeon-r-processor-family-6-model-167"."""
    return re.sub(r"[^a-z0-9]+", "-", cpu_features.cpu_model().lower()).strip("-")


def write_cpu_result(result, path=None, name="cpu"):
    """Writes result (atomically) to path, by default results/cpu-NAME-<cpu>-<date>.json; returns the path."""
    path = path or os.path.join(RESULTS, f"cpu-{name}-{cpu_slug()}-{result['environment']['date']}.json")
    write_json(path, result)
    print(f"wrote {path}")
    return path
