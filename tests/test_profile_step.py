"""scripts/profile_step.py's trace reading: kernels grouped into kinds from a jax (Perfetto,
.json.gz) and a torch (Chrome, .json) trace, per step, and the side-by-side comparison; and
scripts/gpu_check.sh's refusal where there is no GPU."""
import gzip
import json
import os
import subprocess
from pathlib import Path

import jax
import pytest

from scripts import profile_step as ps


def jax_trace(path):
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
    for name, us in (("_dkv_kernel", 600.0), ("_qkv_bwd_kernel", 300.0), ("_lse_kernel", 400.0),
                     ("nvjet_sm90_qqsss_176x128", 800.0), ("nvjet_sm90_tss_192x192", 1000.0),
                     ("loop_select_fusion_4", 300.0)):
        events += [{"ph": "X", "pid": 1, "name": name, "dur": us / 2}] * 2
    events.append({"ph": "X", "pid": 2, "name": "host_work", "dur": 9999.0})  # not a GPU event
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def torch_trace(path):
    events = [{"ph": "X", "cat": "kernel", "name": n, "dur": us} for n, us in
              (("triton_tem_fused_flex_attention_backward_0", 800.0), ("nvjet_sm90_qqsss_256x128", 600.0),
               ("triton_poi_fused_mul_relu_3", 150.0), ("triton_red_fused_rsqrt_1", 50.0))]
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 5000.0})
    path.write_text(json.dumps({"traceEvents": events}))


def test_kinds_and_comparison(tmp_path):
    j, t = tmp_path / "p.json.gz", tmp_path / "torch_trace.json"
    jax_trace(j)
    torch_trace(t)
    kinds = ps.by_kind(ps.kernel_times(j)[0])
    assert kinds == {"attention (fused kernel)": 600.0, "QK-norm / rotary / value mix (jgpt.qkv_gpu)": 300.0,
                     "fused head passes (jgpt.head_gpu)": 400.0, "fp8 matmul": 800.0, "matmul": 1000.0,
                     "fused elementwise": 300.0}
    text = ps.summarize(j, steps=2, top=3)
    assert "summed GPU kernel time per step: 1.7 ms over 2 steps" in text
    assert "| nvjet_sm90_tss_192x192 | 1 | 0.50 | 29.4% |" in text
    table = ps.compare([j, t], ["jgpt", "torch"], steps=2).splitlines()
    rows = {ln.split(" | ")[0].strip("| "): ln.split(" | ")[1:] for ln in table[2:]}
    assert rows["attention (fused kernel)"] == ["0.3", "0.4 |"]
    assert rows["fp8 matmul"] == ["0.4", "0.3 |"]
    assert rows["reduction"] == ["0.0", "0.0 |"]  # torch's 50 us over 2 steps
    assert rows["total"] == ["1.7", "0.8 |"]


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU the script runs its checks")
def test_gpu_check_refuses_without_a_gpu(tmp_path):
    """scripts/gpu_check.sh stops with one clear line (and exit 2) where jax has no GPU."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                       env={**os.environ, "OUT": str(tmp_path / "out")}, timeout=120)
    assert r.returncode == 2 and "gpu_check: no GPU for jax" in r.stderr, (r.returncode, r.stderr)


def test_gemm_table_counts_cublas_calls_and_triton_gemm_fusions():
    hlo = "\n".join([
        '  %custom-call.3 = (bf16[49152,768]{1,0}, s8[4194304]{0}) custom-call(bf16[49152,3072]{1,0} %a, '
        'bf16[768,3072]{1,0} %b), custom_call_target="__cublas$lt$matmul", backend_config={}',
        '  %custom-call.4 = (bf16[49152,768]{1,0}, s8[4194304]{0}) custom-call(%c, %d), '
        'custom_call_target="__cublas$lt$matmul"',
        '  ROOT %custom-call.9 = (f32[768,3072]{1,0}, s8[1024]{0}) custom-call(%e, %f), '
        'custom_call_target="__cublas$lt$matmul"',
        '  %gemm_fusion_dot_general.158 = bf16[49152,3072]{1,0} fusion(%g, %h), kind=kCustom, '
        'calls=%gemm_fusion_dot_general_158_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}',
        '  %loop_add_fusion.2 = f32[49152,768]{1,0} fusion(%i, %j), kind=kLoop, calls=%fused_add',
        '  %custom-call.5 = f32[8] custom-call(%k), custom_call_target="__gpu$xla.gpu.triton"',
    ])
    table = ps.gemm_table(hlo).splitlines()
    assert table[2:] == ["| 2 | __cublas$lt$matmul | bf16[49152,768] |",
                         "| 1 | __cublas$lt$matmul | f32[768,3072] |",
                         "| 1 | triton_gemm | bf16[49152,3072] |"]


def test_record_step_gemms_are_cublaslt_writing_bf16_on_gpu():
    """The record step's activation GEMMs (every product with a sequence's 49,152 rows) are
    cuBLASLt calls writing bf16, as the record's cuBLAS GEMMs (model.GEMM_OUT's narrow dot, the
    default on GPUs); XLA's Triton GEMM fusions of the convert form took 3% more step time and
    handed an fp32 product on (BENCHMARKS.md session 8). Compiles the step; runs nothing."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    from scripts.bench import T, build_jgpt
    step, state, x, y = build_jgpt("auto", remat=False, seqs=1)
    rows = [line for line in ps.gemm_table(step.lower(state, x, y, 14).compile().as_text()).splitlines()[2:]
            if f"[{T}," in line]
    assert rows, "no GEMM with the sequence's rows in the optimised HLO"
    assert all("__cublas$lt$matmul |" in r and f"| bf16[{T}," in r for r in rows), rows


def test_traffic_table_counts_operand_and_result_bytes_in_the_loop_body():
    hlo = "\n".join([
        "%fused_add (param_0: f32[1024,256], param_1: bf16[1024,256]) -> f32[1024,256] {",
        "  %param_0 = f32[1024,256]{1,0} parameter(0)",
        "  %param_1 = bf16[1024,256]{1,0} parameter(1)",
        "  %convert = f32[1024,256]{1,0} convert(%param_1)",
        "  ROOT %add = f32[1024,256]{1,0} add(%param_0, %convert)",
        "}",
        "%fused_pick (param_0.1: bf16[512,4096], param_1.1: s32[512,1]) -> bf16[512,1] {",
        "  %param_0.1 = bf16[512,4096]{1,0} parameter(0)",
        "  %param_1.1 = s32[512,1]{1,0} parameter(1)",
        "  ROOT %gather = bf16[512,1]{1,0} gather(%param_0.1, %param_1.1), offset_dims={}",
        "}",
        "%body (p: (s32[], f32[1024,256])) -> (s32[], f32[1024,256]) {",
        "  %gte.1 = f32[1024,256]{1,0} get-tuple-element(%p), index=1",
        "  %w = bf16[1024,256]{1,0} parameter(1)",
        "  %z = bf16[512,4096]{1,0} parameter(2)",
        "  %idx = s32[512,1]{1,0} parameter(3)",
        '  %custom-call.1 = (bf16[1024,256]{1,0}, s8[4096]{0}) custom-call(%w, %w), '
        'custom_call_target="__cublas$lt$matmul"',
        '  %loop_add_fusion = f32[1024,256]{1,0} fusion(%gte.1, %w), kind=kLoop, calls=%fused_add, '
        'metadata={op_name="jit(train_step)/while/body/jvp()/add"}',
        '  %input_pick = bf16[512,1]{1,0} fusion(%z, %idx), kind=kLoop, calls=%fused_pick, '
        'metadata={op_name="jit(train_step)/while/body/transpose(jvp())/gather"}',
        "}",
        "ENTRY %main (a: f32[8]) -> f32[8] {",
        '  %while.1 = (s32[], f32[1024,256]{1,0}) while(%t), condition=%cond, body=%body, '
        'backend_config={"known_trip_count":{"n":"8"}}',
        "}",
    ])
    table = ps.traffic_table(hlo, tb_per_s=1.0)
    assert "computation %body: 3 kernels, run 8x per step" in table
    n = 1024 * 256
    # the GEMM: two bf16 operands and a bf16 result (the s8 workspace not counted)
    assert f"| GEMM (cuBLAS) | 1 | {3 * 2 * n / 1e9:.2f} |" in table
    # the add reads f32 + bf16 and writes f32; the pick reads 512 of z's values, the indices, writes 512
    loop = (4 + 2 + 4) * n + 512 * 2 + 512 * 4 + 512 * 2
    assert f"| XLA elementwise fusions | 2 | {loop / 1e9:.2f} | {loop / 1e12 * 1e3:.2f} |" in table
    assert f"| loop_add_fusion | {10 * n / 1e6:.0f} | fwd | f32[1024,256] | add |" in table
    assert "| input_pick | 0 | bwd | bf16[512,1] | gather |" in table
