"""The last step of scripts/gpu_check.sh: one PASS/FAIL line per target of the README's performance
table ("On a GPU"), and the summary JSON $OUT/gpu_check.json.

  python scripts/gpu_check_summary.py OUT STEP=EXIT_CODE ... [memcheck_errors=N] [racecheck_errors=N]
A step that did not run is absent (or "x"); its targets print MISSING and fail the summary.
Exit code: 0 when every target of the steps that ran passed, 1 otherwise.
"""

import glob
import json
import os
import sys
import tempfile
import xml.etree.ElementTree as ET

STEPS = ("build", "info", "tests", "memcheck", "racecheck", "bench", "e2e-smollm2", "e2e-llama1b", "scaling-e2e")
# (target, the step it needs): the README's table, in its order
TARGETS = (
    ("the CUDA extension builds with this machine's torch", "build"),
    ("every CUDA and Triton test passes on the GPU", "tests"),
    ("compute-sanitizer memcheck: 0 errors", "memcheck"),
    ("compute-sanitizer racecheck: 0 errors", "racecheck"),
    ("GPU kernel benchmarks run and write their JSON", "bench"),
    ("SmolLM2-135M train 4/3 reclora/lora_peft <= 1.05", "e2e-smollm2"),
    ("SmolLM2-135M train 5/4 published/reclora >= 1.5", "e2e-smollm2"),
    ("1B LLaMA train 4/3 reclora/lora_peft <= 1.05", "e2e-llama1b"),
    ("1B LLaMA train 5/4 published/reclora >= 1.5", "e2e-llama1b"),
    ("Long-Short scaling study runs on the GPU", "scaling-e2e"),
)
E2E_FILES = {"e2e-smollm2": "gpu-e2e-smollm2-135m.json", "e2e-llama1b": "gpu-e2e-llama-1b.json"}


def parse(argv):
    out, pairs = argv[0], dict(arg.split("=", 1) for arg in argv[1:])
    codes = {step: int(pairs[step]) for step in STEPS if pairs.get(step, "x") not in ("x", "")}
    errors = {
        tool: int(pairs[f"{tool}_errors"]) if pairs.get(f"{tool}_errors", "null") not in ("null", "") else None
        for tool in ("memcheck", "racecheck")
    }
    return out, codes, errors


def tests_summary(out):
    path = os.path.join(out, "tests.xml")
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def e2e_targets(out, step):
    path = os.path.join(out, E2E_FILES[step])
    return json.load(open(path))["targets"] if os.path.exists(path) else {}


def verdict(target, step, out, codes, errors, tests):
    """(PASS|FAIL|MISSING, detail)."""
    if step not in codes:
        return "MISSING", "the step did not run"
    code = codes[step]
    if step in ("memcheck", "racecheck"):
        count = errors[step]
        if count is None:
            return "FAIL", f"no ERROR SUMMARY line (exit {code})"
        return ("PASS" if count == 0 else "FAIL"), f"{count} errors"
    if step == "tests":
        if tests is None:
            return "FAIL", f"no tests.xml (exit {code})"
        bad = tests["failures"] + tests["errors"]
        ran = tests["tests"] - tests["skipped"]
        return (
            "PASS" if code == 0 and bad == 0 and ran > 0 else "FAIL"
        ), f"{ran} ran, {bad} failed, {tests['skipped']} skipped"
    if step in E2E_FILES:
        ratio = target[target.index("train ") :]  # e2e.py's own name: "train 4/3 ... <= 1.05"
        found = {key: value for key, value in e2e_targets(out, step).items() if key == ratio}
        if not found:
            return "FAIL", f"{E2E_FILES[step]} has no target '{ratio}' (exit {code})"
        (value,) = found.values()
        return ("PASS" if value["met"] else "FAIL"), f"{value['value']:.3f}"
    return ("PASS" if code == 0 else "FAIL"), f"exit {code}"


def summarize(out, codes, errors):
    tests = tests_summary(out)
    lines = []
    for target, step in TARGETS:
        status, detail = verdict(target, step, out, codes, errors, tests)
        lines.append({"target": target, "step": step, "status": status, "detail": detail})
    summary = {
        "exit_codes": codes,
        "sanitizer_errors": errors,
        "tests": tests,
        "targets": lines,
        "benchmarks": sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "gpu-*.json"))),
    }
    for name in E2E_FILES.values():
        path = os.path.join(out, name)
        if os.path.exists(path):
            with open(path) as f:
                e2e = json.load(f)
            summary.setdefault("e2e", {})[name] = {"train": e2e["ratios"]["train"], "targets": e2e["targets"]}
    return summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit(__doc__)
    out, codes, errors = parse(argv)
    summary = summarize(out, codes, errors)
    with tempfile.NamedTemporaryFile("w", dir=out, delete=False, suffix=".tmp") as tmp:
        json.dump(summary, tmp, indent=2)
    os.replace(tmp.name, os.path.join(out, "gpu_check.json"))
    print(json.dumps({k: summary[k] for k in ("exit_codes", "sanitizer_errors", "tests")}, indent=2))
    for line in summary["targets"]:
        print(f"{line['status']:7s} {line['target']}  ({line['detail']})")
    ran = [line for line in summary["targets"] if line["status"] != "MISSING"]
    failed = [line for line in ran if line["status"] == "FAIL"]
    print(f"gpu_check: {len(ran) - len(failed)} of {len(ran)} targets that ran passed; wrote {out}/gpu_check.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
