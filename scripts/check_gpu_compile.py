"""Compiles every GPU kernel for sm_80 and sm_90 without a GPU and checks its resources.

  python scripts/check_gpu_compile.py [--cuda-lib build/cuda/lib] [--out build/gpu-compile.json] [--jobs N]
                                      [--select REGEX]

Triton: the ops' GPU code paths run on meta tensors at the benchmark shapes (benchmarks/shapes.py)
in every kernel dtype, with kernel launches intercepted: each launch gives the kernel, its
arguments and, for autotuned kernels, the configurations the pruner keeps. Each one is compiled
ahead of time with triton.compile for both targets, with the specializations Triton's own
launcher derives from those arguments (unit strides as constexpr 1, divisibility by 16), and
its cubin's resources are read with cuobjdump.
CUDA: cuobjdump reads every kernel of the CUDA build (make check-cuda) for both archs.
A kernel is ok when it compiled, fits the arch's shared memory per block and does not spill.
Writes the JSON, prints a table and the occupancy of the hot kernels; exits 1 on any failure.
"""

import argparse
import concurrent.futures
import contextlib
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402

ARCHS = {"sm_80": 80, "sm_90": 90}
# Shared memory a block may use, and an SM holds (bytes): A100 and H100 data sheets.
SHARED_PER_BLOCK = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
SHARED_PER_SM = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}
REGISTERS_PER_SM, MAX_THREADS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 2048, 32
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The CUDA kernels' dynamic shared memory at most (csrc/retrieval_cuda.cu: SelectShared is
# 1,104 bytes, RowsShared 4,128; kChunkMax scores of 4 bytes, kSortMax keys of 8 bytes).
CUDA_DYNAMIC_SHARED = {
    "score_select_kernel": 1104 + 4096 * 4,
    "merge_kernel": 1104 + 4096 * 8,
    "pool_kernel": 4128,
    "retrieve_backward_kernel": 4128,
    "attention_backward_kernel": 4128,
}
CUDA_THREADS = 256  # every CUDA kernel's block (kThreads)
HOT_KERNELS = ("_matmul_kernel", "_chunk_topk_kernel", "score_select_kernel", "gate_loras_kernel")
# The Triton kernels that take longest to compile (cold, 2 workers: about 4 s and 1.5 s a compilation,
# the others under 1 s; "seconds" in build/gpu-compile.json).
SLOW_KERNELS = ("_chunk_topk_kernel", "_matmul_kernel")


def tool(name):
    """ptxas, cuobjdump and nvdisasm ship in Triton's wheel."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        sys.exit(f"check_gpu_compile: {path} is missing (Triton's wheel ships it)")
    return path


# ---- Triton: the launches of the GPU dispatch -------------------------------------------------


@contextlib.contextmanager
def intercepted_launches(record, arch):
    """Kernel launches call record(jit_function, args, kwargs) instead of running; autotuned
    ones once per configuration their pruner keeps. The dispatch sees an H100's 132 SMs and the
    arch's shared memory per block."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from reclora_kernels import gated_lora_triton, retrieval_triton

    def autotuned(self, *args, grid, warmup, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            record(self.fn, args, {**kwargs, **config.all_kwargs()})

    def jitted(self, *args, grid, warmup, **kwargs):
        record(self, args, kwargs)

    saved = (
        Autotuner.run,
        JITFunction.run,
        gated_lora_triton._num_sms,
        retrieval_triton._num_sms,
        gated_lora_triton._shared_bytes_per_block,
        torch.cuda.current_device,
    )
    Autotuner.run, JITFunction.run = autotuned, jitted
    gated_lora_triton._num_sms = retrieval_triton._num_sms = lambda device: 132
    gated_lora_triton._shared_bytes_per_block = lambda device: SHARED_PER_BLOCK[arch]
    torch.cuda.current_device = lambda: 0
    try:
        yield
    finally:
        (
            Autotuner.run,
            JITFunction.run,
            gated_lora_triton._num_sms,
            retrieval_triton._num_sms,
            gated_lora_triton._shared_bytes_per_block,
            torch.cuda.current_device,
        ) = saved


def benchmark_calls():
    """(op label, dtype name, thunk) for every GPU entry point at the benchmark shapes, on meta tensors."""
    from benchmarks.shapes import LORA_7B, LORA_SMOLLM2, RETRIEVAL_GPU
    from reclora_kernels import gated_lora_triton as lora
    from reclora_kernels import retrieval_triton as retrieval

    def meta(*shape, dtype):
        return torch.empty(*shape, device="meta", dtype=dtype)

    calls = []
    for dname, dtype in DTYPES.items():
        for shape_name, s in (("smollm2", LORA_SMOLLM2), ("7b", LORA_7B)):
            tokens = s["batch"] * s["tokens"]
            x = meta(tokens, s["d_in"], dtype=dtype)
            gate = meta(s["batch"], s["num_loras"], dtype=torch.float32)
            a = meta(s["num_loras"], s["rank"], s["d_in"], dtype=dtype)
            b = meta(s["num_loras"], s["d_out"], s["rank"], dtype=dtype)
            w = meta(s["d_out"], s["d_in"], dtype=dtype)
            bias = meta(s["d_out"], dtype=dtype)
            grad = meta(tokens, s["d_out"], dtype=dtype)
            u = meta(tokens, s["num_loras"] * s["rank"], dtype=torch.float32)  # the forward's x A_cat^T
            packed = torch.empty(tokens, device="meta", dtype=torch.int64)
            for output_mix in (False, True):
                for weight, bias_ in ((None, None), (w, bias)):
                    for index in (None, packed):
                        label = (
                            f"gated_lora {shape_name}{' linear' if weight is not None else ''}"
                            f"{' packed' if index is not None else ''} {'output' if output_mix else 'weight'}-mix"
                        )
                        calls.append(
                            (
                                label + " forward",
                                dname,
                                lambda x=x, w=weight, bi=bias_, g=gate, a=a, b=b, i=index, o=output_mix: (
                                    lora.gated_lora_forward(x, w, bi, g, a, b, i, 2.0, o)
                                ),
                            )
                        )
                        calls.append(
                            (
                                label + " backward",
                                dname,
                                lambda x=x, u=u, w=weight, g=gate, a=a, b=b, i=index, o=output_mix, gr=grad: (
                                    lora.gated_lora_backward(gr, x, u, w, g, a, b, i, 2.0, o)
                                ),
                            )
                        )
        for s in RETRIEVAL_GPU:
            batch, length, dim, k = s["batch"], s["length"], s["dim"], s["k"]
            query = meta(batch, dim, dtype=dtype)
            lengths = torch.empty(batch, device="meta", dtype=torch.int64)
            for layout in ("table", "dense"):
                keys = (
                    meta(s["table_rows"], dim, dtype=dtype)
                    if layout == "table"
                    else meta(batch, length, dim, dtype=dtype)
                )
                ids = torch.empty(batch, length, device="meta", dtype=torch.int64) if layout == "table" else None
                index = torch.empty(batch, k, device="meta", dtype=torch.int64)
                probs = meta(batch, k, dtype=torch.float32)
                label = f"retrieval L={length} {layout}"
                calls += [
                    (
                        label + " retrieve_topk forward",
                        dname,
                        lambda q=query, kk=keys, i=ids, ln=lengths, k=k: retrieval.retrieve_topk_forward(
                            q, kk, i, ln, None, k, 1.0
                        ),
                    ),
                    (
                        label + " retrieve_topk backward",
                        dname,
                        lambda q=query, kk=keys, i=ids, ix=index, p=probs: retrieval.retrieve_topk_backward(
                            p, q, kk, i, ix, 1.0
                        ),
                    ),
                    (
                        label + " attention forward",
                        dname,
                        lambda q=query, kk=keys, i=ids, ln=lengths, k=k: retrieval.topk_attention_forward(
                            q, kk, kk, i, ln, None, k, 0.125
                        ),
                    ),
                    (
                        label + " attention backward",
                        dname,
                        lambda q=query, kk=keys, i=ids, ix=index, p=probs: retrieval.topk_attention_backward(
                            q, q, kk, kk, i, ix, p, 0.125
                        ),
                    ),
                ]
    return calls


def triton_jobs():
    """Distinct compilations (kernel, arch, specialization, configuration), with the ops that launch each."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backends = {arch: make_backend(GPUTarget("cuda", cc, 32)) for arch, cc in ARCHS.items()}
    binders = {}
    jobs = {}
    current = {}

    def record(fn, args, kwargs):
        kwargs = {**kwargs, "debug": False, "instrumentation_mode": knobs.compilation.instrumentation_mode}
        arch = current["arch"]
        backend = backends[arch]
        if (fn, arch) not in binders:  # Triton's own argument specialization, for this target
            binders[fn, arch] = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binders[fn, arch](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        config = {
            name: value
            for name, value in kwargs.items()
            if name in fn.arg_names and fn.params[fn.arg_names.index(name)].is_constexpr
        }
        config.update(num_warps=options.num_warps, num_stages=options.num_stages)
        job_key = (
            fn.__name__,
            arch,
            repr(sorted(signature.items())),
            repr(sorted(constexprs.items(), key=str)),
            repr(sorted(attrs.items(), key=str)),
            options.num_warps,
            options.num_stages,
        )
        job = jobs.setdefault(
            job_key,
            {
                "name": fn.__name__,
                "module": fn.module,
                "arch": arch,
                "dtypes": set(),
                "config": config,
                "signature": signature,
                "constexprs": constexprs,
                "attrs": attrs,
                "options": {"num_warps": options.num_warps, "num_stages": options.num_stages},
                "ops": set(),
            },
        )
        job["ops"].add(current["op"])
        job["dtypes"].add(current["dtype"])

    for arch in ARCHS:
        with intercepted_launches(record, arch):
            for op, dtype, call in benchmark_calls():
                current.update(op=op, dtype=dtype, arch=arch)
                call()
    for job in jobs.values():  # the op dtypes whose launches compile to this same kernel
        dtypes = job.pop("dtypes")
        job["dtype"] = "/".join(d for d in DTYPES if d in dtypes)
    return list(jobs.values())


def compile_triton(job):
    """Compiles one job and reads its resources; runs in a worker process."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(job["module"]), job["name"])
    while not isinstance(fn, JITFunction):  # an autotuned kernel wraps its JIT function
        fn = fn.fn
    result = {key: job[key] for key in ("name", "arch", "config", "dtype")}
    result.update(backend="triton", ops=sorted(job["ops"]), threads=32 * job["options"]["num_warps"])
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn, job["signature"], job["constexprs"], job["attrs"]),
            target=GPUTarget("cuda", ARCHS[job["arch"]], 32),
            options=job["options"],
        )
    except Exception as error:
        result.update(
            ok=False,
            reason=f"compile failed: {type(error).__name__}: {str(error)[:300]}",
            registers=None,
            spill_bytes=None,
            shared_bytes=None,
        )
        return result
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = resource_usage(cubin.name)
    ((function, resources),) = usage.items()
    # Spills live in the stack frame: without one there are none, and ptxas need not run again.
    spills = ptx_spills(compiled.asm["ptx"]) if resources["STACK"] + resources["LOCAL"] else 0
    result["seconds"] = round(time.perf_counter() - start, 2)
    result.update(
        registers=resources["REG"],
        stack_bytes=resources["STACK"],
        spill_bytes=spills,
        shared_bytes=compiled.metadata.shared + resources["SHARED"],
    )
    return judged(result)


def ptx_spills(ptx):
    """Spill stores + loads in bytes per thread, from ptxas -v on the kernel's PTX as Triton assembles
    it (the cubin's stack frame alone also counts local arrays)."""
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [tool("ptxas"), "-lineinfo", "-v", f"--gpu-name={arch}", source, "-o", os.path.join(tmp, "k.o")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    return sum(int(n) for pair in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log) for n in pair)


# ---- CUDA: the built extension -----------------------------------------------------------------


def resource_usage(path, arch=None):
    """{kernel symbol: {REG, STACK, SHARED, LOCAL}} from cuobjdump (for one arch of a fat binary)."""
    command = [tool("cuobjdump"), "--dump-resource-usage"] + (["-arch", arch] if arch else []) + [path]
    text = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    usage = {}
    for function, fields in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", text):
        usage[function] = {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", fields)}
    return usage


def ptxas_spills(log_path):
    """{(kernel symbol, arch): spill bytes} from the ptxas -v lines of a CUDA build log (make check-cuda)."""
    spills, entry, properties = {}, None, None
    if not os.path.exists(log_path):
        return spills
    with open(log_path, errors="replace") as f:
        lines = f.readlines()
    for line in lines:
        if match := re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line):
            entry = match.groups()
        elif match := re.search(r"Function properties for (\S+)", line):
            properties = match.group(1)
        elif (
            (match := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line))
            and entry
            and properties == entry[0]
        ):
            spills[entry] = int(match.group(1)) + int(match.group(2))
    return spills


def demangle(symbols):
    names = subprocess.run(["c++filt"], input="\n".join(symbols), capture_output=True, text=True, check=True).stdout
    return dict(zip(symbols, names.splitlines()))


def cuda_kernels(cuda_lib):
    libraries = glob.glob(os.path.join(cuda_lib, "reclora_kernels", "_C*.so"))
    if len(libraries) != 1:
        sys.exit(f"check_gpu_compile: expected one CUDA build under {cuda_lib}/reclora_kernels (make check-cuda)")
    results = []
    spills = ptxas_spills(os.path.join(os.path.dirname(os.path.abspath(cuda_lib)), "build.log"))
    for arch in ARCHS:
        usage = resource_usage(libraries[0], arch)
        if not usage:
            results.append(
                {
                    "name": "(all CUDA kernels)",
                    "backend": "cuda",
                    "arch": arch,
                    "config": None,
                    "dtype": None,
                    "registers": None,
                    "spill_bytes": None,
                    "shared_bytes": None,
                    "ok": False,
                    "reason": f"the CUDA build has no {arch} code",
                }
            )
            continue
        names = demangle(list(usage))
        for symbol, resources in sorted(usage.items(), key=lambda item: names[item[0]]):
            full = names[symbol]
            short = re.sub(r"^(?:void )?(?:\(anonymous namespace\)::)?", "", full).split("(")[0]
            base = short.split("<")[0]
            template = short[len(base) :]
            dtype = next(
                (
                    d
                    for d, t in (
                        ("fp32", "float"),
                        ("fp16", "c10::Half"),
                        ("bf16", "c10::BFloat16"),
                        ("fp64", "double"),
                    )
                    if re.search(rf"\b{re.escape(t)}\b", template)
                ),
                "fp32",
            )
            # ptxas's own count from the build log; without it any stack or local memory counts as spilled
            # (the stack also holds call frames, e.g. of a device-side assertion).
            spilled = spills.get((symbol, arch), resources["STACK"] + resources["LOCAL"])
            result = {
                "name": base,
                "backend": "cuda",
                "arch": arch,
                "config": template or None,
                "dtype": dtype,
                "threads": CUDA_THREADS,
                "registers": resources["REG"],
                "stack_bytes": resources["STACK"],
                "spill_bytes": spilled,
                "spills_from": "ptxas" if (symbol, arch) in spills else "stack",
                "shared_bytes": resources["SHARED"] + CUDA_DYNAMIC_SHARED.get(base, 0),
            }
            results.append(judged(result))
    return results


# ---- judging, occupancy, report ---------------------------------------------------------------


def judged(result):
    problems = []
    if result["shared_bytes"] > SHARED_PER_BLOCK[result["arch"]]:
        problems.append(f"{result['shared_bytes']} B shared > {SHARED_PER_BLOCK[result['arch']]} B per block")
    if result["spill_bytes"] > 0:
        problems.append(f"{result['spill_bytes']} B of register spills per thread")
    result["ok"] = not problems
    result["reason"] = "; ".join(problems) or None
    result["blocks_per_sm"] = occupancy(result) if result["ok"] else None
    return result


def occupancy(result):
    """Resident blocks per SM, by registers (256-register warp granules), shared memory and threads."""
    warps = max(1, result["threads"] // 32)
    per_warp = -(-max(result["registers"], 1) * 32 // 256) * 256
    by_registers = REGISTERS_PER_SM // per_warp // warps
    shared = result["shared_bytes"]
    # Every resident block also reserves 1 KB of shared memory for the system.
    by_shared = SHARED_PER_SM[result["arch"]] // (shared + 1024) if shared else MAX_BLOCKS_PER_SM
    by_threads = MAX_THREADS_PER_SM // result["threads"]
    return {
        "blocks": min(by_registers, by_shared, by_threads, MAX_BLOCKS_PER_SM),
        "limit": min((by_registers, "registers"), (by_shared, "shared"), (by_threads, "threads"))[1],
    }


def print_table(results):
    header = f"{'backend':7s} {'arch':5s} {'kernel':28s} {'dtype':14s} {'regs':>4s} {'spill':>5s} {'shared':>7s} {'blk/SM':>6s} ok  config"
    print(header)
    print("-" * len(header))
    for r in results:
        blocks = r.get("blocks_per_sm") or {}
        config = (
            r["config"]
            if isinstance(r["config"], str) or r["config"] is None
            else " ".join(f"{k}={v}" for k, v in r["config"].items())
        )
        print(
            f"{r['backend']:7s} {r['arch']:5s} {r['name'][:28]:28s} {str(r['dtype']):14s} {str(r['registers']):>4s} "
            f"{str(r['spill_bytes']):>5s} {str(r['shared_bytes']):>7s} {str(blocks.get('blocks', '-')):>6s} "
            f"{'yes' if r['ok'] else 'NO '} {config or ''}{'' if r['ok'] else '  <- ' + r['reason']}"
        )


def print_occupancy(results):
    print("\nOccupancy of the hot kernels (resident blocks per SM and what limits it; min..max over configs):")
    for name in HOT_KERNELS:
        for arch in ARCHS:
            rows = [r for r in results if r["name"] == name and r["arch"] == arch and r["ok"]]
            if rows:
                blocks = sorted(r["blocks_per_sm"]["blocks"] for r in rows)
                limits = sorted({r["blocks_per_sm"]["limit"] for r in rows})
                warps = sorted({r["threads"] // 32 for r in rows})
                print(
                    f"  {name:24s} {arch}: {blocks[0]}..{blocks[-1]} blocks/SM of {warps} warps, "
                    f"limited by {', '.join(limits)} ({len(rows)} configs)"
                )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cuda-lib",
        default=os.path.join(ROOT, "build", "cuda", "lib"),
        help="CUDA build of the extension (make check-cuda); 'none' skips the CUDA kernels",
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "build", "gpu-compile.json"))
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    parser.add_argument(
        "--select",
        default=None,
        metavar="REGEX",
        help="only the Triton compilations whose 'kernel arch dtype' matches (a partial check)",
    )
    parser.add_argument(
        "--list-jobs", action="store_true", help="print the Triton compilations as JSON, compile nothing"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    jobs = [
        job
        for job in triton_jobs()
        if args.select is None or re.search(args.select, f"{job['name']} {job['arch']} {job['dtype']}")
    ]
    if args.list_jobs:
        json.dump(
            [
                {
                    **job,
                    "ops": sorted(job["ops"]),
                    "attrs": {str(k): v for k, v in job["attrs"].items()},
                    "constexprs": {str(k): v for k, v in job["constexprs"].items()},
                }
                for job in jobs
            ],
            sys.stdout,
            default=str,
        )
        return
    # The slowest compilations first, so that no worker is left alone with one at the end.
    jobs.sort(key=lambda job: SLOW_KERNELS.index(job["name"]) if job["name"] in SLOW_KERNELS else len(SLOW_KERNELS))
    print(
        f"check_gpu_compile: {len(jobs)} Triton compilations (kernel x arch x specialization x config), "
        f"{args.jobs} at a time; cache {os.environ['TRITON_CACHE_DIR']}",
        flush=True,
    )
    results = []
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        for done in concurrent.futures.as_completed([pool.submit(compile_triton, job) for job in jobs]):
            r = done.result()
            results.append(r)
            print(
                f"[{len(results)}/{len(jobs)} {time.perf_counter() - start:.0f} s] {r['name']} {r['arch']} {r['dtype']}: "
                f"{'ok' if r['ok'] else 'NOT OK: ' + r['reason']}",
                flush=True,
            )
    if args.cuda_lib != "none":
        results += cuda_kernels(args.cuda_lib)
    results.sort(key=lambda r: (r["backend"], r["arch"], r["name"], str(r["dtype"]), str(r["config"])))
    print_table(results)
    print_occupancy(results)
    failures = [r for r in results if not r["ok"]]
    summary = {
        "kernels": results,
        "failures": len(failures),
        "seconds": round(time.perf_counter() - start, 1),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "archs": list(ARCHS),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(args.out)), delete=False) as tmp:
        json.dump(summary, tmp, indent=1, default=str)
    os.replace(tmp.name, args.out)
    print(
        f"\ncheck_gpu_compile: {len(results)} kernels, {len(failures)} not ok, {summary['seconds']} s; wrote {args.out}"
    )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    # Before reclora_kernels is imported: the GPU dispatch, its autotune configurations and tiles.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(ROOT, "build", "triton-cache"))
    main()
