"""The run-time choice of the CPU kernels' instruction set (csrc/kernels/cpu/isa.*): what build_info
reports, FUSEDRNN_CPU_ISA forcing a lower ISA (and refusing one the CPU lacks at import), the
oneDNN GEMM policy that follows it, and that the per-ISA translation units export no inline code
that the linker could pick for portable callers."""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

import fusedrnn
from fusedrnn.testing import ISAS, isas_of_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ops = torch.ops.fusedrnn


def _child(code, **env):
    """Runs `code` in a fresh interpreter with `env` added (the ISA is chosen once per process)."""
    full = dict(os.environ, **env)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_build_info_names_the_isa():
    info = fusedrnn.build_info()
    assert info["cpu_isa_best"] == isas_of_cpu()[-1], (
        f"the library's best ISA {info['cpu_isa_best']} is not the best this CPU has "
        f"({isas_of_cpu()}): a build without its AVX2 / AVX-512 kernels?"
    )
    forced = os.environ.get("FUSEDRNN_CPU_ISA")
    assert info["cpu_isa"] == (forced or info["cpu_isa_best"])


@pytest.mark.parametrize("isa", ISAS)
def test_env_forces_an_isa(isa):
    if isa not in isas_of_cpu():
        pytest.skip(f"this CPU has no {isa}")
    r = _child(
        "import fusedrnn; i = fusedrnn.build_info(); "
        "print(i['cpu_isa'], i['cpu_fused_steps'], i['cpu_onednn_gemm'])",
        FUSEDRNN_CPU_ISA=isa,
    )
    assert r.returncode == 0, r.stderr
    name, fused, onednn = r.stdout.split()
    assert name == isa
    assert fused == str(isa != "baseline")
    # oneDNN's matmul only where ATen accepts it (AVX512BW/VL/DQ), i.e. under avx512(_bf16)
    assert onednn == "False" or isa in ("avx512", "avx512_bf16")


@pytest.mark.parametrize("value", ["sse9", "AVX2", "avx-512"])
def test_env_unknown_isa_is_an_error_at_import(value):
    r = _child("import fusedrnn", FUSEDRNN_CPU_ISA=value)
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "FUSEDRNN_CPU_ISA" in r.stderr
    assert "baseline, avx2, avx512" in r.stderr


@pytest.mark.skipif("avx512" in isas_of_cpu(), reason="needs a CPU without AVX-512 to ask for it")
def test_env_isa_the_cpu_lacks_is_an_error_at_import():
    r = _child("import fusedrnn", FUSEDRNN_CPU_ISA="avx512")
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "does not have" in r.stderr, r.stderr


def test_set_isa_refuses_unknown_and_missing():
    with pytest.raises(ValueError, match="must be one of"):
        ops._set_cpu_isa("neon")
    for isa in ISAS:
        if isa not in isas_of_cpu():
            with pytest.raises(ValueError, match="does not have"):
                ops._set_cpu_isa(isa)
    assert ops.cpu_isa() in isas_of_cpu()


def _cpu_vendor():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    return None


@pytest.mark.parametrize("mode", ["auto", "aten", "onednn"])
def test_fp32_gemm_choice(mode):
    """FUSEDRNN_CPU_GEMM: by default large fp32 GEMMs take oneDNN's matmul except on Intel CPUs
    (at::mm's MKL is faster there); `aten` never takes oneDNN, `onednn` takes it for fp32 on
    every CPU whose ISA allows it. A layer large enough for the oneDNN threshold runs and matches
    torch.nn under each choice."""
    code = (
        "import torch, fusedrnn; i = fusedrnn.build_info(); "
        "torch.manual_seed(0); m = fusedrnn.LSTM(64, 64); r = torch.nn.LSTM(64, 64); "
        "r.load_state_dict(m.state_dict()); x = torch.randn(16, 16, 64); "
        "print(i['cpu_isa'], i['cpu_onednn_gemm'], i['cpu_onednn_fp32_gemm'], "
        "(m(x)[0] - r(x)[0]).abs().max().item())"
    )
    r = _child(code, FUSEDRNN_CPU_GEMM=mode)
    assert r.returncode == 0, r.stderr
    isa, onednn, fp32, err = r.stdout.split()
    if onednn == "True":  # (and where torch has oneDNN's matmul, which these builds do)
        assert isa in ("avx512", "avx512_bf16") and mode != "aten"
    if onednn == "False" or mode == "aten":
        assert fp32 == "False"
    elif mode == "onednn":
        assert fp32 == "True"
    else:
        assert fp32 == str(_cpu_vendor() != "GenuineIntel")
    assert float(err) < 1e-5  # fp32 (the suite's fp32 tolerance)


def test_fp32_gemm_choice_refuses_unknown_values():
    r = _child("import fusedrnn; fusedrnn.build_info()", FUSEDRNN_CPU_GEMM="mkl")
    assert r.returncode != 0
    assert "FUSEDRNN_CPU_GEMM must be auto, aten or onednn, got 'mkl'" in r.stderr


def test_onednn_gemm_follows_the_isa(cpu_isa):
    """The weak oneDNN matmul is only ever called under avx512 and avx512_bf16 (ATen refuses it on
    CPUs without AVX512BW/VL/DQ); under every other ISA the GEMMs go through at::mm, and a layer
    large enough for the oneDNN size threshold runs and matches the reference."""
    if cpu_isa not in ("avx512", "avx512_bf16"):
        assert ops.cpu_onednn_gemm() is False
    torch.manual_seed(0)
    lstm = fusedrnn.LSTM(64, 64)
    ref = torch.nn.LSTM(64, 64)
    ref.load_state_dict(lstm.state_dict())
    x = torch.randn(16, 16, 64)  # the input projection is 256 x 256 x 64 = 2^22 MACs
    got, want = lstm(x)[0], ref(x)[0]
    assert (got - want).abs().max().item() < 1e-5  # fp32 (the suite's fp32 tolerance)


def _compile_flags():
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    flags = [
        "-O2",
        "-std=c++17",
        "-fPIC",
        "-I" + os.path.join(ROOT, "csrc"),
        "-I" + sysconfig.get_paths()["include"],
    ]
    return flags + ["-I" + p for p in include_paths()]


def _isa_units(isa):
    """The translation units compiled for `isa`: kernels/cpu/isa/<isa>_*.cpp (for avx512, not
    avx512_bf16's)."""
    d = os.path.join(ROOT, "csrc", "kernels", "cpu", "isa")
    names = [f for f in os.listdir(d) if f.startswith(isa + "_") and f.endswith(".cpp")]
    if isa == "avx512":
        names = [f for f in names if not f.startswith("avx512_bf16_")]
    return sorted(os.path.join(d, f) for f in names)


def _compile_and_dump(src, d):
    """nm's defined symbols and objdump's disassembly of `src` compiled alone."""
    obj = os.path.join(d, os.path.basename(src) + ".o")
    r = subprocess.run(
        ["c++", *_compile_flags(), "-c", src, "-o", obj],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    nm = subprocess.run(
        ["nm", "-C", "--defined-only", obj], capture_output=True, text=True, check=True
    ).stdout
    asm = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", obj],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return nm, asm


@pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or shutil.which("nm") is None
    or shutil.which("objdump") is None
    or shutil.which("c++") is None,
    reason="needs a Linux C++ toolchain (c++, nm, objdump)",
)
@pytest.mark.parametrize("isa", ["avx2", "avx512", "avx512_bf16"])
def test_isa_units_export_only_their_own_namespace(isa):
    """Every symbol a per-ISA translation unit defines with external linkage (functions, weak
    inline and template instances) lives in fusedrnn::cpu::<isa>:: (or is an instance of a
    template defined before the target switch, such as at::parallel_for, whose code is compiled
    for the baseline and whose name carries the ISA's lambda), except the table getters, which
    are compiled for the baseline: no code compiled for the ISA can be chosen by the linker for a
    caller in portable code. Every unit of the ISA (kernels/cpu/isa/<isa>_*.cpp), compiled side
    by side."""
    from concurrent.futures import ThreadPoolExecutor

    units = _isa_units(isa)
    assert len(units) >= 4, f"expected the units of {isa} in csrc/kernels/cpu/isa, got {units}"
    kinds = ["fused_kernels"] + (
        [] if isa == "avx512_bf16" else ["step_kernels", "layer_norm_kernels"]
    )
    getters = {f"fusedrnn::cpu::{k}_{isa}()" for k in kinds}
    with tempfile.TemporaryDirectory() as d:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            dumps = list(pool.map(lambda src: _compile_and_dump(src, d), units))
    defined = set()
    for src, (nm, asm) in zip(units, dumps):
        # external linkage: upper-case types, and weak / unique / indirect ones (w, v, u, i)
        exported = [
            parts[2]
            for parts in (line.split(" ", 2) for line in nm.splitlines())
            if len(parts) == 3 and (parts[1].isupper() or parts[1] in "wvui")
        ]
        own = getters & set(exported)
        defined |= own
        # DW.ref.__gxx_personality_v0: the exception-handling personality pointer (data, the
        # same in every unit)
        foreign = [
            s
            for s in exported
            if s not in getters
            and s != "DW.ref.__gxx_personality_v0"
            and not re.search(rf"\bfusedrnn::cpu::{isa}::", s)
        ]
        assert not foreign, f"{src} exports code outside its ISA namespace: {foreign[:10]}"
        # What runs on every CPU: the getters and the unit's static initialiser (from the
        # headers it includes) must contain no VEX / EVEX instruction (their mnemonics start
        # with v).
        portable = {}
        current = None
        for line in asm.splitlines():
            head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
            if head:
                name = head.group(1)
                current = name if (name in own or name.startswith("_GLOBAL__sub_I")) else None
                if current:
                    portable[current] = []
            elif current and "\t" in line:
                portable[current].append(line.split("\t")[1].split()[0])
        assert set(portable) >= own, f"getters not found in the disassembly: {sorted(portable)}"
        for name, mnemonics in portable.items():
            vex = [m for m in mnemonics if m.startswith("v")]
            assert not vex, f"{name} in {src} runs on every CPU but has {vex[:5]}"
    assert defined == getters, f"{isa}'s units define the getters {defined}, expected {getters}"


# A layer in bf16 where ATen's bf16 at::mm has no oneDNN kernels (an AVX2-only CPU; here oneDNN
# is capped at AVX2): the library's CPU GEMMs of bf16 calls then run in fp32 and round the result
# once (execution/gemm.cpp; ATen's own bf16 loops are ~30x slower there), in the input
# projection, the per-step GEMMs of short calls, the input gradient (beta 0) and the weight
# gradients (accumulated, beta 1). Every cell and output against the fp64 reference under the
# bf16 rule, time-major with initial states and packed in reverse.
BF16_WITHOUT_ONEDNN = r"""
import torch, fusedrnn
from fusedrnn import functional, reference
from fusedrnn.testing import CELLS, layer_results, make_layer_args, within_tolerance
assert fusedrnn.build_info()["cpu_isa"] == "avx2", fusedrnn.build_info()
if torch.ops.mkldnn._is_mkldnn_bf16_supported():
    print("oneDNN bf16 still available")
    raise SystemExit(0)
bad, n = [], 0
for cell in CELLS:
    for layout in ("time_major", "packed_reverse"):
        for T, B in ((8, 40), (2, 3)):
            args = make_layer_args(cell, layout, T=T, B=B, I=24, H=48)
            got = layer_results(functional.rnn_layer, cell, args, "cpu", torch.bfloat16)
            ref = layer_results(reference.layer, cell, args, "cpu", torch.float64)
            lowp = layer_results(reference.layer, cell, args, "cpu", torch.bfloat16)
            for k in ref:
                ok, bound = within_tolerance(got[k], ref[k], torch.bfloat16, lowp[k])
                n += 1
                if not ok:
                    bad.append((cell, layout, T, B, k, bound))
assert not bad, bad
print("checks", n)
"""


@pytest.mark.skipif("avx2" not in isas_of_cpu(), reason="needs a CPU with AVX2 + FMA")
def test_bf16_layers_without_onednn_bf16_gemms():
    env = dict(
        os.environ,
        FUSEDRNN_CPU_ISA="avx2",
        ATEN_CPU_CAPABILITY="avx2",
        ONEDNN_MAX_CPU_ISA="AVX2",
        OMP_NUM_THREADS="1",
    )
    r = subprocess.run(
        [sys.executable, "-c", BF16_WITHOUT_ONEDNN],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    if "oneDNN bf16 still available" in r.stdout:
        pytest.skip("ATen still reports oneDNN bf16 GEMMs with ONEDNN_MAX_CPU_ISA=AVX2 here")
    assert r.stdout.strip().startswith("checks") and int(r.stdout.split()[-1]) > 0, r.stdout
